"""An ablation's report: the headline in words, the Markdown + self-contained HTML page with its Pareto plots and
significance matrix, from the rows :func:`sensq.ablate.run_ablation` writes and the statistics of
:mod:`sensq.ablate.statistics`. ``sensq report ABLATION_DIR`` renders a folder again."""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from pathlib import Path

from sensq.ablate.statistics import headline
from sensq.errors import InputError
from sensq.stats import format_interval
from sensq.store.files import atomic_write_bytes


def kept_text(row: dict, digits: int, separator: str = " ") -> str:
    """The share of each expert's parameters kept in high precision, ``high / low``, plus (after ``separator``)
    the share kept so at some denoising steps only (rules with a step range), when there is one."""
    kept = " / ".join(f"{v:.{digits}%}" for v in row["protected_share"].values())
    ranged = row.get("protected_at_some_steps") or {}
    if any(ranged.values()):
        kept += separator + "(+" + " / ".join(f"{v:.{digits}%}" for v in ranged.values()) + " at some steps)"
    return kept


def interval_text(row: dict, metric: str, digits: int) -> str:
    interval = row.get("intervals", {}).get(metric)
    if interval is None:
        value = row.get("metrics", {}).get(metric)
        return "" if value is None else f"{value:.{digits}g}"
    return format_interval(interval, digits)


def _gain_text(gain: dict | None) -> str:
    if not gain:
        return "not measurable"
    verdict = "distinguishable from noise" if gain["significant"] else "within noise"
    return f"{gain['mean']:.4g} lower latent NMSE (95% interval {gain['low']:.4g} to {gain['high']:.4g}; {verdict})"


def headline_lines(result: dict) -> list[str]:
    """The headline as sentences (Markdown and HTML render them as a list)."""
    head = result.get("headline") or {}
    if not head:
        return ["No set ranked by sensq (budget or top-k) in this ablation, so no recommendation: compare the "
                "sets in the table and the significance matrix."]
    kept = ", ".join(f"{e}: {n} layers ({head['protected_share'][e]:.1%} of its parameters)"
                     for e, n in head["protected_layers"].items())
    real = head.get("real_size")
    gain = head.get("gain_over_best_fixed")
    fixed_won = bool(gain and gain["significant"] and gain["mean"] < 0)
    lines = [f"Recommended: **{head['best_fixed_set']}**, a fixed rule: it beat sensq's best ranked set "
             f"({head['set']}) beyond noise at no more bits; sensq's set keeps {kept}." if fixed_won else
             f"Recommended: **{head['set']}**, keeping in high precision {kept}.",
             f"Cost: {head['effective_bits']:.2f} effective bits per weight; {head['weight_gb'] * 1e3:.2f} MB of "
             f"weights here (BF16: {head['weight_gb_bf16'] * 1e3:.2f} MB)"
             + (f"; the same rules on {real['model']}: {real['effective_bits']:.2f} bits, "
                f"{real['weight_gb']:.1f} GB of expert weights (BF16: {real['weight_gb_bf16']:.1f} GB)"
                if real else "") + ".",
             f"Latent NMSE vs full precision: {format_interval(head['latent_nmse'])} (mean [95% interval] over "
             f"{head['latent_nmse']['n']} generations: {len(result['prompts'])} prompts x {len(result['seeds'])} "
             "seeds)."]
    if "gain_over_none" in head:
        lines.append(f"Gain over no protection: {_gain_text(head['gain_over_none'])}.")
    if "best_fixed_set" in head:
        if fixed_won:
            lines.append(f"**The fixed set {head['best_fixed_set']} does better at the same cost**: "
                         f"{-gain['mean']:.4g} lower latent NMSE than the recommended set (95% interval "
                         f"{-gain['high']:.4g} to {-gain['low']:.4g}; distinguishable from noise). The ranking's "
                         "metric does not find the layers that matter on this model: protect the fixed set, or "
                         "rank with --metric grad-e2e (the default) or e2e.")
        else:
            lines.append(f"Gain over the best fixed set that costs no more bits ({head['best_fixed_set']}): "
                         f"{_gain_text(gain)}.")
    else:
        lines.append("No fixed set costs as few bits: nothing fixed to compare at equal budget.")
    verdicts = head.get("per_budget") or []
    if verdicts:
        words = {"won": "beats", "lost": "loses to", "tie": "is within noise of"}
        lines.append("Each ranked set against the best fixed set that costs no more bits: " + "; ".join(
            f"{v['set']} {words[v['verdict']]} {v['fixed']}" for v in verdicts) + ".")
    if result.get("held_out_seeds"):
        lines.append("Measured on seeds the ranking did not use (each prompt's probe seed is left out).")
    return lines


def _pareto_plot(plt, result: dict, path: Path, metric: str, label: str) -> None:
    from sensq.report import save_png

    """Quality vs effective bits with 95% error bars; points are numbered (names in the legend) and sets of equal
    cost are spread sideways, so that no label or bar hides another; the lower-left front is drawn."""
    rows = [r for r in result["rows"] if metric in r["metrics"]]
    fig, ax = plt.subplots(figsize=(9, 5))
    points = []
    # sets of (nearly) equal cost are spread sideways, so that their error bars do not hide each other
    bits = [r["effective_bits"] for r in rows]
    step = 0.012 * max(max(bits) - min(bits), 1.0) if bits else 0.0
    same_cost: dict[float, list[int]] = {}
    for index, value in enumerate(bits):
        same_cost.setdefault(round(value, 2), []).append(index)
    dodge = {i: (k - (len(group) - 1) / 2) * step for group in same_cost.values() for k, i in enumerate(group)}
    for number, row in enumerate(rows, start=1):
        interval = row["intervals"][metric]
        x, y = row["effective_bits"], interval["mean"]
        ax.errorbar([x + dodge[number - 1]], [y], yerr=[[y - interval["low"]], [interval["high"] - y]], fmt="o",
                    capsize=3, label=f"{number}: {row['set']}")
        # numbers staggered around their point: sets of equal cost and error stay readable
        offset = ((6, 4), (6, -11), (-13, 4), (-13, -11))[(number - 1) % 4]
        ax.annotate(str(number), (x + dodge[number - 1], y), textcoords="offset points", xytext=offset, fontsize=8)
        points.append((x + dodge[number - 1], y))
    lower_is_better = metric.endswith("nmse")
    front, best = [], None
    for x, y in sorted(points):
        if best is None or (y < best if lower_is_better else y > best):
            front.append((x, y))
            best = y
    if len(front) > 1:
        ax.plot(*zip(*front, strict=True), color="#888", linestyle="--", linewidth=1, label="front")
    reference = result.get("reference_row")
    if reference and metric in reference.get("metrics", {}):
        ax.axhline(reference["metrics"][metric], color="#2a2", linewidth=1, label="full precision")
    ax.set_xlabel("effective bits per weight (both experts; sets of equal cost spread sideways)")
    ax.set_ylabel(label)
    ax.set_title(f"{result['format']} W4A4: {label} vs cost (95% intervals over prompts x seeds)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_png(fig, path)
    plt.close(fig)


def _significance_matrix(result: dict, metric: str = "latent_nmse") -> tuple[list[str], list[list[str]]]:
    """Rows x columns of sets: "<" when the row set's error is lower than the column's beyond noise, ">" when
    higher, "≈" when the difference is within noise."""
    names = [r["set"] for r in result["rows"]]
    verdict = {}
    for c in result.get("comparisons", []):
        if c["metric"] != metric:
            continue
        sign = "≈" if not c["significant"] else ("<" if c["mean"] < 0 else ">")
        verdict[(c["a"], c["b"])] = sign
        verdict[(c["b"], c["a"])] = {"<": ">", ">": "<", "≈": "≈"}[sign]
    return names, [[verdict.get((a, b), "") if a != b else "·" for b in names] for a in names]


def write_ablation_report(result: dict, out: Path, commands: list[str] | None = None) -> list[str]:
    """``ablation.md``, ``ablation.html`` (self-contained) and PNG plots from an ablation result: the headline,
    the Pareto plots with intervals, the table (full precision first, every quality column the CLI shows),
    and which differences are distinguishable from noise."""
    from sensq.report import pyplot

    plt = pyplot()
    rows = result["rows"]
    if not rows:
        raise InputError("the ablation has no rows")
    if "intervals" not in rows[0]:
        raise InputError(f"{str(out)!r} holds an ablation written by an older sensq (no intervals); run sensq "
                         "ablate again into a new folder")
    result = {**result, "headline": headline(result)}  # from the rows: a re-rendered report follows the rules
    procedural = "procedural" in rows[0]["metrics"]
    files = [out / "pareto_latent_nmse.png"]
    _pareto_plot(plt, result, files[0], "latent_nmse", "final-latent NMSE vs full precision")
    if procedural:
        files.append(out / "pareto_procedural.png")
        _pareto_plot(plt, result, files[1], "procedural", "procedural evaluator average (higher is better)")
    columns, table = _table(result, procedural)
    page = _Page(result, columns, table, files, _note(result), "\n".join(commands or []))
    atomic_write_bytes(out / "ablation.md", page.markdown().encode())
    atomic_write_bytes(out / "ablation.html", page.html().encode())
    return [str(p) for p in files] + [str(out / "ablation.md"), str(out / "ablation.html")]


def _table(result: dict, procedural: bool) -> tuple[list[str], list[list[str]]]:
    """The columns and the rows of the ablation's table: full precision first (when scored), then every set."""
    rows = result["rows"]
    real_model = next((r["real_size"]["model"] for r in rows if r.get("real_size")), "real size")
    columns = ["protected set", "kept per expert", "effective bits", "weight MB (BF16 MB)",
               f"{real_model.rpartition('/')[2]} GB (same rules)",
               "latent NMSE [95%]", "PSNR dB [95%]", "SSIM [95%]"] + (["procedural [95%]"] if procedural else []) + [
        "first-frame NMSE", "temporal NMSE"]
    table = []
    reference = result.get("reference_row")
    if reference is not None:
        bf16 = rows[0]["weight_bytes_bf16"]
        real = rows[0].get("real_size") or {}
        everything = " / ".join("100%" for _ in rows[0]["protected_share"])
        table.append(["full precision", everything, "16.00", f"{bf16 / 1e6:.3f} ({bf16 / 1e6:.3f})",
                      f"{real.get('weight_gb_bf16', float('nan')):.1f}", "0", "inf", "1"]
                     + ([interval_text(reference, "procedural", 3)] if procedural else []) + ["0", "0"])
    for row in rows:
        m = row["metrics"]
        real = row.get("real_size")
        table.append([row["set"], kept_text(row, 1, separator="\n"),
                      f"{row['effective_bits']:.2f}",
                      f"{row['weight_bytes'] / 1e6:.3f} ({row['weight_bytes_bf16'] / 1e6:.3f})",
                      f"{real['weight_gb']:.1f}" if real else "n/a",
                      interval_text(row, "latent_nmse", 3), interval_text(row, "psnr", 3),
                      interval_text(row, "ssim", 3)]
                     + ([interval_text(row, "procedural", 3)] if procedural else [])
                     + [f"{m.get('first_frame_nmse', math.nan):.3g}", f"{m.get('temporal_nmse', math.nan):.4f}"])
    return columns, table


def _note(result: dict) -> str:
    """What every number is measured against, how the variants were deployed, and the intervals."""
    rows = result["rows"]
    n_items = rows[0]["intervals"]["latent_nmse"]["n"]
    own = {row["set"]: row["rule_calibrations"] for row in rows if row.get("rule_calibrations")}
    by_rule = ("; plan rules name their own in " + ", ".join(f"{name} ({'/'.join(c)})" for name, c in own.items())
               if own else "")
    return (f"All metrics against the full-precision generation of the same prompt and seed ({n_items} generations: "
            f"{len(result['prompts'])} prompts x {len(result['seeds'])} seeds). Every variant is deployed as sensq "
            f"apply-plan deploys it (calibration {result['deploy']['calibrate']}{by_rule}; backend "
            f"{result['deploy']['backend']}). Intervals: percentile bootstrap of the mean, 95%, seeded.")


NOISE_LEGEND = "`<`: the row's set has lower error than the column's beyond noise; `>` higher; `≈` within noise."


@dataclass
class _Page:
    """The ablation page's parts, rendered as Markdown and as self-contained HTML."""

    result: dict
    columns: list[str]
    table: list[list[str]]
    files: list[Path]
    note: str
    reproduce: str

    @property
    def title(self) -> str:
        return f"sensq ablation: {self.result['format']} W4A4 on {self.result['model']['id']}"

    def markdown(self) -> str:
        names, matrix = _significance_matrix(self.result)
        md = [f"# {self.title}", "", *[f"* {line}" for line in headline_lines(self.result)], "", self.note, "",
              "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns),
              *["| " + " | ".join(c.replace("\n", " ") for c in cells) + " |" for cells in self.table], "",
              *[f"![{p.stem}]({p.name})" for p in self.files], "",
              "## Which differences are distinguishable from noise (latent NMSE)", "", NOISE_LEGEND, "",
              "| | " + " | ".join(str(i + 1) for i in range(len(names))) + " |", "|" + "---|" * (len(names) + 1),
              *[f"| {i + 1}: {name} | " + " | ".join(cells) + " |" for i, (name, cells) in enumerate(
                  zip(names, matrix, strict=True))]]
        if self.reproduce:
            md += ["", "## Reproduce", "", "```bash", self.reproduce, "```"]
        return "\n".join(md) + "\n"

    def html(self) -> str:
        from sensq.report import embedded_png, html_page

        names, matrix = _significance_matrix(self.result)
        bold, strong = re.compile(r"\*\*(.+?)\*\*"), r"<b>\1</b>"
        headline_html = "<ul class='headline'>" + "".join(
            "<li>" + bold.sub(strong, html.escape(line)) + "</li>" for line in headline_lines(self.result)) + "</ul>"
        table_html = ("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in self.columns) + "</tr>" + "".join(
            "<tr>" + "".join(f"<td{' class=wrap' if i == 1 else ''}>{html.escape(c).replace(chr(10), '<br>')}</td>"
                             for i, c in enumerate(cells)) + "</tr>"
            for cells in self.table) + "</table>")
        matrix_html = ("<table><tr><th></th>" + "".join(f"<th>{i + 1}</th>" for i in range(len(names))) + "</tr>"
                       + "".join(f"<tr><th style='text-align:left'>{i + 1}: {html.escape(name)}</th>" + "".join(
                           f"<td style='text-align:center'>{html.escape(c)}</td>" for c in cells) + "</tr>"
                           for i, (name, cells) in enumerate(zip(names, matrix, strict=True))) + "</table>")
        legend = ("<p><code>&lt;</code>: the row's set has lower error than the column's beyond noise; "
                  "<code>&gt;</code> higher; <code>≈</code> within noise.</p>")
        return html_page(self.title, headline_html + f"<p>{html.escape(self.note)}</p>" + table_html
                         + "".join(embedded_png(p) for p in self.files)
                         + "<h2>Which differences are distinguishable from noise (latent NMSE)</h2>" + legend
                         + matrix_html
                         + (f"<h2>Reproduce</h2><pre>{html.escape(self.reproduce)}</pre>" if self.reproduce else ""))
