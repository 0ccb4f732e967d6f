"""The ranking report: per-expert heatmaps (layer x step), top-layer bars with the protected set
marked, and a self-contained HTML page plus Markdown."""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sensq.report import embedded_png, html_page, pyplot, save_png
from sensq.store.files import atomic_write_bytes, claim_output_folder, write_json

REPORT_SCHEMA = "sensq.report/1"
REPORT_MARKER = "report.json"
"""Written last into a report folder: marks it as sensq's, so a later report may replace it."""


@dataclass
class ReportResult:
    out_dir: str
    files: list[str]
    notes: list[str] = field(default_factory=list)


def _label(ranking, expert: str) -> str:
    from sensq.models import recorded_family

    return recorded_family(ranking.provenance.get("family")).expert_label(expert)


def _heatmap(plt, ranking, expert: str, fmt: str, path: Path) -> bool:
    layers = ranking.experts[expert]  # model (execution) order
    if not layers or not layers[0].per_step:
        return False
    values = np.array([np.mean(layer.per_step[fmt], axis=1) for layer in layers])  # [layer, step]
    if ranking.metric == "sqnr":
        values = -values  # show sensitivity: higher = worse
    if not np.isfinite(values).any():
        return False  # nothing to draw: the table shows the nan/inf values
    values = np.where(np.isfinite(values), values, np.nan)  # non-finite cells stay blank
    positive = values[np.isfinite(values) & (values > 0)]
    fig, ax = plt.subplots(figsize=(2.0 + 0.6 * values.shape[1], 0.5 + 0.18 * len(layers)))
    if positive.size and ranking.metric != "sqnr":
        from matplotlib.colors import LogNorm

        image = ax.imshow(np.clip(values, positive.min(), None), aspect="auto", cmap="magma",
                          norm=LogNorm(vmin=positive.min(), vmax=positive.max()))
    else:
        image = ax.imshow(values, aspect="auto", cmap="magma")
    steps = ranking.steps.get(expert, list(range(values.shape[1])))
    sigmas = ranking.sigmas.get(expert, [])
    ax.set_xticks(range(values.shape[1]),
                  [f"{s}\nσ={g:.2f}" for s, g in zip(steps, sigmas, strict=False)] or list(map(str, steps)))
    ax.set_yticks(range(len(layers)), [layer.name for layer in layers], fontsize=7)
    ax.set_xlabel("denoising step")
    label = "-SQNR dB" if ranking.metric == "sqnr" else ranking.metric
    ax.set_title(f"{_label(ranking, expert)}: {label} per step ({fmt}, mean over CFG branches)")
    fig.colorbar(image, ax=ax, label=label)
    save_png(fig, path)
    plt.close(fig)
    return True


def kept_marks(plan, expert: str) -> dict[str, str]:
    """Per layer of ``expert`` that a plan keeps in high precision: ``yes``, or the steps (or noise levels) at
    which it does so when a rule with a range keeps it there only."""
    marks = {name: "yes" for name in plan.protected(expert)}
    for row in plan.layers:
        if row.expert == expert and row.protected_range() is not None:
            marks[row.layer] = row.protected_range()
    return marks


def _bars(plt, ranking, expert: str, fmt: str, protected: dict[str, str], top: int, path: Path) -> None:
    layers = ranking.ordered(expert, fmt)[:top]
    values = [layer.value[fmt] for layer in layers]
    finite = [v for v in values if math.isfinite(v)]
    colors = ["#2e86c1" if layer.name not in protected else "#c0392b" if protected[layer.name] == "yes"
              else "#e67e22" for layer in layers]
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.28 * len(layers)))
    # a non-finite value gets no bar but its label (nan, inf): a log axis cannot draw it, nor can a linear one
    ax.barh(range(len(layers)), [v if math.isfinite(v) else 0.0 for v in values], color=colors)
    for position, value in enumerate(values):
        if not math.isfinite(value):
            ax.annotate(f" {value}", (0, position), va="center", fontsize=8, color="#555")
    ax.set_yticks(range(len(layers)), [layer.name for layer in layers], fontsize=8)
    ax.invert_yaxis()
    # a log axis only where the values span a decade: over less, matplotlib labels its minor ticks and they
    # collide ("2.2x10^-2 2.4x10^-2 ...")
    if (ranking.metric != "sqnr" and finite and all(v > 0 for v in finite) and len(finite) == len(values)
            and max(finite) >= 10 * min(finite)):
        ax.set_xscale("log")
    ax.set_xlabel(f"{ranking.metric} ({ranking.reduce})")
    ranged = any(mark != "yes" for mark in protected.values())
    ax.set_title(f"{_label(ranking, expert)}: top {len(layers)} layers, {fmt} (red = kept in high precision"
                 + (", orange = at some steps only)" if ranged else ")"))
    save_png(fig, path)
    plt.close(fig)


def nonfinite_notes(ranking) -> list[str]:
    """One note per expert and format whose values include NaN or Inf (the figures draw them apart; a plan
    refuses NaN)."""
    import math

    notes = []
    for fmt in ranking.formats:
        for expert, layers in ranking.experts.items():
            bad = [layer.name for layer in layers if fmt in layer.value and not math.isfinite(layer.value[fmt])]
            if bad:
                notes.append(f"{expert}: {len(bad)} of {len(layers)} layers have no finite {fmt} value (NaN or Inf), "
                             f"e.g. {bad[0]}: a failed measurement; sensq plan refuses NaN, rank again")
    return notes


def plan_mismatches(ranking, plan) -> list[str]:
    """What a reader must know when a plan is drawn over a ranking it was not made from: another model, or
    another format's order."""
    notes = []
    planned_for = (plan.model or {}).get("fingerprint")
    ranked_on = ranking.provenance.get("model_fingerprint")
    if planned_for and ranked_on and planned_for != ranked_on:
        notes.append(f"the plan was made for model {plan.model.get('id')!r} (fingerprint {planned_for}) but the "
                     f"ranking is of {ranking.provenance.get('model_id')!r} ({ranked_on})")
    ordered_by = (plan.source or {}).get("ranking_format")
    if ordered_by and ordered_by not in ranking.formats:
        notes.append(f"the plan follows a {ordered_by} ranking, which this ranking does not hold (it ranks "
                     f"{', '.join(ranking.formats)}); its layers are drawn in {ranking.formats[0]} order")
    return notes


def signal_line(ranking) -> str:
    """Which signal ranked the layers, and why it was (or was not) chosen (docs/sensitivity.md)."""
    from sensq.metrics import DEFAULT_METRIC, METRICS

    metric = METRICS.get(ranking.metric)
    if ranking.metric == DEFAULT_METRIC:
        return (f"Ranked by {ranking.metric}, sensq's default: each layer's end-to-end damage (the final-latent NMSE "
                "with only that layer quantized), estimated to first order along the probe's own trajectory. Of the "
                "cheap signals it agrees best with leave-one-in e2e on the embedded models (Spearman 0.88-0.95 per "
                "expert; mse 0.07-0.55), so the data chose it (docs/sensitivity.md).")
    if metric is not None and metric.operand == "latents":
        return (f"Ranked by {ranking.metric}: measured end to end, one generation per "
                f"{'block' if ranking.granularity == 'block' else 'layer'} and prompt (the ground truth the cheap "
                "signals are checked against).")
    if metric is not None and metric.local:
        return (f"Ranked by {ranking.metric}, a local metric: each layer's own output error, blind to how it "
                "propagates (Spearman 0.07-0.55 against e2e on the embedded models). For plans, rank with the "
                f"default, {DEFAULT_METRIC}.")
    return f"Ranked by {ranking.metric}."


def ranking_headline(ranking, plan, fmt: str) -> list[str]:
    """What a reader needs first: per expert the most sensitive layers; with a plan, what it protects and what
    that costs here and, with the same rules, on the real model of its family (Wan2.2-T2V-A14B); and how to
    measure what it buys (a ranking predicts, only an ablation measures)."""
    lines = [signal_line(ranking)]
    for expert, result in (ranking.validation or {}).get("experts", {}).items():
        rho = result["spearman"]
        lines.append(f"Checked against e2e on this probe, {_label(ranking, expert)}: Spearman rho {rho['mean']:.3f} "
                     f"[{rho['low']:.3f}, {rho['high']:.3f}] over {result['layers']} layers"
                     + (f", top-{result['top_k']} overlap {result['top_k_overlap']}/{result['top_k']}"
                        if "top_k" in result else "") + (" (weak)." if result["weak"] else "."))
    for expert in ranking.experts:
        top = [layer.name for layer in ranking.ordered(expert, fmt)
               if fmt in layer.value and math.isfinite(layer.value[fmt])][:3]
        lines.append(f"Most sensitive in the {_label(ranking, expert)} ({ranking.metric}, {fmt}): "
                     + ", ".join(top) + "." if top else
                     f"No order in the {_label(ranking, expert)}: none of its {fmt} values is finite (see the note).")
    if plan is not None and plan.summary:
        kept = ", ".join(f"{e}: {len(plan.protected(e))} layers ({plan.summary[e]['protected_share']:.1%} of its "
                         "parameters)" for e in ranking.experts if e in plan.summary)
        total = plan.summary["total"]
        lines.append(f"The plan keeps in high precision {kept}: {total['effective_bits']:.2f} effective bits per "
                     f"weight, {total['weight_bytes_after'] / 1e6:.2f} MB of weights here (BF16 "
                     f"{total['weight_bytes_before'] / 1e6:.2f} MB).")
        ranged = {e: sum(mark != "yes" for mark in kept_marks(plan, e).values()) for e in ranking.experts}
        if any(ranged.values()):
            lines.append("At some denoising steps only, it also keeps in high precision "
                         + ", ".join(f"{e}: {n} layers" for e, n in ranged.items()) + " (column 'kept').")
        from sensq.plan import summary_at_real_size

        real = summary_at_real_size(plan)
        if real:
            lines.append(f"The same rules on {real['model']}: {real['effective_bits']:.2f} bits, "
                         f"{real['weight_gb']:.1f} GB of expert weights (BF16 {real['weight_gb_bf16']:.1f} GB).")
    lines.append("What protection buys is measured, with intervals, by sensq ablate on this ranking.")
    return lines


def _expert_plots(plt, ranking, expert: str, fmt: str, protected: dict, top: int, out: Path) -> list[Path]:
    """The expert's top-layer bars and (when there are steps to show) its layers x steps heatmap."""
    bars, heat = out / f"{expert}_top.png", out / f"{expert}_heatmap.png"
    _bars(plt, ranking, expert, fmt, protected, top, bars)
    return [bars] + ([heat] if _heatmap(plt, ranking, expert, fmt, heat) else [])


def _expert_section(ranking, expert: str, fmt: str, protected: dict, top: int,
                    images: list[Path]) -> tuple[str, str]:
    """The expert's table of its most sensitive layers and its plots, as Markdown and as HTML."""
    rows = ranking.ordered(expert, fmt)[:top]
    table_md = ["| # | layer | params | " + " | ".join(ranking.formats) + " | kept in high precision |",
                "|---|---|---|" + "---|" * len(ranking.formats) + "---|"]
    for layer in rows:
        cells = " | ".join(f"{layer.value[f]:.4g}" for f in ranking.formats)
        table_md.append(f"| {layer.rank[fmt]} | `{layer.name}` | {layer.params:,} | {cells} | "
                        f"{protected.get(layer.name, '')} |")
    markdown = (f"## {_label(ranking, expert)}\n\n" + "\n".join(table_md) + "\n\n"
                + "\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n")
    table_html = "<table><tr><th>#</th><th>layer</th><th>params</th>" + "".join(
        f"<th>{html.escape(f)}</th>" for f in ranking.formats) + "<th>kept</th></tr>" + "".join(
        f"<tr><td>{layer.rank[fmt]}</td><td><code>{html.escape(layer.name)}</code></td><td>{layer.params:,}</td>"
        + "".join(f"<td>{layer.value[f]:.4g}</td>" for f in ranking.formats)
        + f"<td>{html.escape(protected.get(layer.name, ''))}</td></tr>" for layer in rows) + "</table>"
    return markdown, f"<h2>{_label(ranking, expert)}</h2>{table_html}" + "".join(embedded_png(p) for p in images)


def write_ranking_report(ranking, out_dir: str | Path, *, plan=None, top: int = 20,
                         commands: list[str] | None = None) -> ReportResult:
    """Write PNGs, ``report.md`` and a self-contained ``report.html`` into ``out_dir``.

    The protected set shown is the plan's when one is given, else the entrance layers; with a plan the
    layers are ordered by the format the plan was ranked by (when the ranking holds it), and a plan made
    for another model or format is said so at the top.
    """
    out = claim_output_folder(out_dir, REPORT_MARKER, REPORT_SCHEMA, "report folder")
    plt = pyplot()
    fmt = ranking.formats[0]
    notes = (plan_mismatches(ranking, plan) if plan is not None else []) + nonfinite_notes(ranking)
    if plan is not None and (plan.source or {}).get("ranking_format") in ranking.formats:
        fmt = plan.source["ranking_format"]
    files: list[Path] = []
    sections_md: list[str] = []
    sections_html: list[str] = []
    for expert in ranking.experts:
        if plan is not None:
            protected = kept_marks(plan, expert)
        else:
            protected = {layer.name: "yes" for layer in ranking.experts[expert] if layer.entrance}
        images = _expert_plots(plt, ranking, expert, fmt, protected, top, out)
        files += images
        section_md, section_html = _expert_section(ranking, expert, fmt, protected, top, images)
        sections_md.append(section_md)
        sections_html.append(section_html)
    provenance = json.dumps(ranking.provenance, indent=1, default=str)
    agreement = json.dumps(ranking.agreement, indent=1) if ranking.agreement else ""
    reproduce = "\n".join(commands or [])
    reduced = "" if ranking.metric in ("e2e", "grad-e2e") else f" ({ranking.reduce})"
    title = f"sensq ranking: {ranking.metric}{reduced}, {', '.join(ranking.formats)}"
    headline = ranking_headline(ranking, plan, fmt)
    headline_md = "".join(f"* {line}\n" for line in headline) + "\n"
    headline_html = "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in headline) + "</ul>"
    warning_md = "".join(f"> **Note:** {note}.\n\n" for note in notes)
    warning_html = "".join(f"<p style='background:#fff3cd;padding:6px'><b>Note:</b> {html.escape(note)}.</p>"
                           for note in notes)
    markdown = (f"# {title}\n\n" + warning_md + headline_md + "\n".join(sections_md)
                + (f"\n## Format agreement\n\n```json\n{agreement}\n```\n" if agreement else "")
                + f"\n## Provenance\n\n```json\n{provenance}\n```\n"
                + (f"\n## Reproduce\n\n```bash\n{reproduce}\n```\n" if reproduce else ""))
    page = html_page(title, warning_html + headline_html + "".join(sections_html)
                     + (f"<h2>Format agreement</h2><pre>{html.escape(agreement)}</pre>" if agreement else "")
                     + f"<h2>Provenance</h2><pre>{html.escape(provenance)}</pre>"
                     + (f"<h2>Reproduce</h2><pre>{html.escape(reproduce)}</pre>" if reproduce else ""))
    atomic_write_bytes(out / "report.md", markdown.encode())
    atomic_write_bytes(out / "report.html", page.encode())
    files += [out / "report.md", out / "report.html"]
    write_json(out / REPORT_MARKER, {"schema": REPORT_SCHEMA, "files": [p.name for p in files]})
    return ReportResult(str(out), [str(p) for p in files], notes)
