"""Protected-set ablation: for each protected set, quantize, generate, evaluate against full precision.

Every set uses the same format and the same prompts, seeds and trajectory as the full-precision run.
Results land in one folder (resumable: generations resume, scores are recomputed) with a JSON
table and a Markdown + self-contained HTML report.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sensq
from sensq.errors import InputError
from sensq.eval import evaluate_fidelity
from sensq.generate import GenerateRequest, generate
from sensq.plan import Plan, Rule, build_plan, model_layers, summarize, validate_plan
from sensq.quant import dequantize_
from sensq.quant.apply import apply_plan
from sensq.store.files import atomic_write_bytes, claim_output_folder, read_json, write_json

ABLATION_SCHEMA = "sensq.ablation/1"
METRICS = ("latent_nmse", "psnr", "ssim", "first_frame_nmse", "temporal_nmse")


@dataclass(frozen=True)
class ProtectedSet:
    name: str
    plan: Plan


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def standard_sets(model, ranking, fmt: str = "hif4", top_ks=(2, 4), budgets=(0.3,)) -> list[ProtectedSet]:
    """None; the entrance; entrance + top-k (per k); budgets; the entrance in one expert only; and the
    fixed set of ModelOpt's Wan recipe (embedders, proj_out, the first and last three blocks), which is
    left out for models of 6 blocks or fewer (it would keep every block in high precision)."""
    experts = model.adapter.experts(model.pipe)
    everything = [Rule(f"re:{e}:.*", fmt, fmt) for e in experts]
    entrance = r"(patch_embedding|condition_embedder\..*|blocks\.0\..*)"
    n_blocks = len(model.adapter.expert_module(model.pipe, experts[0]).blocks)
    edge = sorted({0, 1, 2, n_blocks - 3, n_blocks - 2, n_blocks - 1} & set(range(n_blocks)))
    modelopt = r"(patch_embedding|condition_embedder\..*|proj_out|blocks\.(" + "|".join(map(str, edge)) + r")\..*)"
    sets = [ProtectedSet("none", Plan(everything)),
            ProtectedSet("entrance", Plan([Rule(f"re:({'|'.join(experts)}):{entrance}", None, None)] + everything))]
    for k in top_ks:
        sets.append(ProtectedSet(f"entrance + top-{k}", build_plan(ranking, top_k=k, fmt=fmt)))
    for budget in budgets:
        sets.append(ProtectedSet(f"budget {budget:.0%}", build_plan(ranking, budget=budget, fmt=fmt)))
    for expert in experts:
        sets.append(ProtectedSet(f"entrance, {expert} only",
                                 Plan([Rule(f"re:{expert}:{entrance}", None, None)] + everything)))
    if n_blocks > 6:
        sets.append(ProtectedSet("ModelOpt Wan recipe",
                                 Plan([Rule(f"re:({'|'.join(experts)}):{modelopt}", None, None)] + everything)))
    return sets


def run_ablation(model, trajectory, prompts, sets: list[ProtectedSet], out: Path, *, fmt: str,
                 reference: Path | None = None, write_video: bool = False,
                 progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Run every set (resuming what is done) and write ``ablation.json`` plus the report."""
    from sensq.eval import evaluate_procedural, is_procedural

    out = claim_output_folder(out, "ablation.json", ABLATION_SCHEMA, "ablation folder")
    reference = reference or out / "full-precision"
    generate(GenerateRequest(model, trajectory, prompts, reference, label="full precision",
                             write_video=write_video))
    procedural = is_procedural([p.text for p in prompts])
    layers = model_layers(model)
    rows = []
    for position, protected in enumerate(sets):
        if progress is not None:
            progress(protected.name, position, len(sets))
        table = validate_plan(protected.plan, layers)
        summary = summarize(table, layers)
        folder = out / "sets" / slug(protected.name)
        folder.mkdir(parents=True, exist_ok=True)
        protected.plan.layers, protected.plan.summary = table, summary
        protected.plan.save(folder / "plan.json")
        apply_plan(model, protected.plan)
        try:
            generate(GenerateRequest(model, trajectory, prompts, folder / "run", label=protected.name,
                                     plan_digest=slug(protected.name) + ":" + str(hash_rules(protected.plan)),
                                     write_video=write_video))
        finally:
            dequantize_(model)
        scores = evaluate_fidelity(folder / "run", reference)
        extra = {"procedural": evaluate_procedural(folder / "run")["aggregate"]} if procedural else {}
        rows.append({
            **extra,
            "set": protected.name, "folder": str(folder.relative_to(out)),
            "protected_share": {e: summary[e]["protected_share"] for e in summary if e != "total"},
            "effective_bits": summary["total"]["effective_bits"],
            "weight_bytes": summary["total"]["weight_bytes_after"],
            "weight_bytes_bf16": summary["total"]["weight_bytes_before"],
            "metrics": {m: scores["aggregate"][m]["mean"] for m in METRICS if m in scores["aggregate"]},
            "worst": {m: scores["aggregate"][m]["worst"] for m in METRICS if m in scores["aggregate"]},
        })
        if progress is not None:
            progress(protected.name, position + 1, len(sets))
    result = {"schema": ABLATION_SCHEMA, "sensq_version": sensq.__version__, "format": fmt,
              "model": {"id": model.model_id, "fingerprint": model.fingerprint},
              "trajectory": trajectory.to_dict(), "prompts": [[p.index, p.text] for p in prompts],
              "reference": str(reference), "rows": rows}
    if procedural:
        result["reference_procedural"] = evaluate_procedural(reference)["aggregate"]["average"]
    write_json(out / "ablation.json", result)
    return result


def hash_rules(plan: Plan) -> int:
    import zlib

    return zlib.crc32(repr([(r.match, r.weight, r.activation) for r in plan.rules]).encode())


def load_ablation(folder: str | Path) -> dict:
    return read_json(Path(folder) / "ablation.json", ABLATION_SCHEMA, "ablation")


def write_ablation_report(result: dict, out: Path, commands: list[str] | None = None) -> list[str]:
    """``ablation.md``, ``ablation.html`` (self-contained) and PNG plots from an ablation result."""
    from sensq.report import embedded_png, html_page, pyplot, save_png

    plt = pyplot()
    rows = result["rows"]
    if not rows:
        raise InputError("the ablation has no rows")
    files = []
    plot = out / "latent_nmse_vs_protected.png"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        share = sum(row["protected_share"].values()) / len(row["protected_share"])
        ax.scatter(share * 100, row["metrics"]["latent_nmse"])
        ax.annotate(row["set"], (share * 100, row["metrics"]["latent_nmse"]), fontsize=7)
    ax.set_xlabel("parameters kept in high precision (%, mean over experts)")
    ax.set_ylabel("final-latent NMSE vs full precision")
    ax.set_title(f"{result['format']} W4A4: error vs protected share")
    save_png(fig, plot)
    plt.close(fig)
    files.append(plot)
    per_expert = [r for r in rows if r["set"].startswith("entrance") and ("only" in r["set"] or r["set"] == "entrance")]
    per_expert += [r for r in rows if r["set"] == "none"]
    if per_expert:
        contribution = out / "per_expert_contribution.png"
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.barh([r["set"] for r in per_expert], [r["metrics"]["latent_nmse"] for r in per_expert], color="#2e86c1")
        ax.set_xlabel("final-latent NMSE")
        ax.set_title("protecting the entrance in one expert vs both vs none")
        save_png(fig, contribution)
        plt.close(fig)
        files.append(contribution)
    header = ("| protected set | protected high / low | effective bits | weight MB (BF16 MB) | latent NMSE | "
              "PSNR dB | SSIM | first-frame NMSE | temporal NMSE |")
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        m = row["metrics"]
        share = " / ".join(f"{v:.1%}" for v in row["protected_share"].values())
        lines.append(f"| {row['set']} | {share} | {row['effective_bits']:.2f} | {row['weight_bytes'] / 1e6:.3f} "
                     f"({row['weight_bytes_bf16'] / 1e6:.3f}) | {m['latent_nmse']:.5f} | {m['psnr']:.2f} | "
                     f"{m['ssim']:.4f} | {m['first_frame_nmse']:.3g} | {m['temporal_nmse']:.4f} |")
    table_md = "\n".join(lines)
    reproduce = "\n".join(commands or [])
    title = f"sensq ablation: {result['format']} W4A4 on {result['model']['id']}"
    markdown = (f"# {title}\n\nAll metrics against the same-step full-precision run (same prompts and seeds).\n\n"
                f"{table_md}\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in files)
                + (f"\n\n## Reproduce\n\n```bash\n{reproduce}\n```\n" if reproduce else "\n"))
    table_html = "<table>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>"
        for i, line in enumerate(lines) if i != 1) + "</table>"
    images = "".join(embedded_png(p) for p in files)
    page = html_page(title, "<p>All metrics against the same-step full-precision run.</p>" + table_html + images
                     + (f"<h2>Reproduce</h2><pre>{html.escape(reproduce)}</pre>" if reproduce else ""))
    atomic_write_bytes(out / "ablation.md", markdown.encode())
    atomic_write_bytes(out / "ablation.html", page.encode())
    return [str(p) for p in files] + [str(out / "ablation.md"), str(out / "ablation.html")]
