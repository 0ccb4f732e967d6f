"""Protected-set ablation: for each protected set, quantize, generate, evaluate against full precision.

Every set uses the same format and the same prompts, seeds and trajectory as the full-precision run.
Results land in one folder (resumable: generations resume, scores are recomputed) with a JSON
table and a Markdown + self-contained HTML report.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import sensq
from sensq.errors import InputError
from sensq.eval import evaluate_fidelity
from sensq.generate import GenerateRequest, config_digest, generate
from sensq.plan import (
    CALIBRATIONS_WITHOUT_DATA,
    Plan,
    Rule,
    build_plan,
    model_layers,
    summarize,
    summary_at_real_size,
    validate_plan,
)
from sensq.quant import dequantize_
from sensq.quant.apply import apply_plan
from sensq.stats import bootstrap_mean, format_interval, paired_difference
from sensq.store.files import (
    atomic_write_bytes,
    claim_output_folder,
    make_parent,
    output_lock,
    read_json,
    write_json,
)

ABLATION_SCHEMA = "sensq.ablation/1"
METRICS = ("latent_nmse", "psnr", "ssim", "first_frame_nmse", "temporal_nmse")


SET_KINDS = ("none", "ranked", "fixed", "random", "plan")
"""What a protected set is: no protection; chosen from a ranking by sensq; a rule a user writes without sensq
(the entrance, a published recipe, the first and last blocks); a random draw; a plan file from elsewhere."""


@dataclass(frozen=True)
class ProtectedSet:
    name: str
    plan: Plan
    kind: str = "ranked"

    def __post_init__(self):
        if self.kind not in SET_KINDS:
            raise ValueError(f"unknown set kind {self.kind!r}; use one of {', '.join(SET_KINDS)}")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def quantize_the_rest(experts: list[str], fmt: str) -> list[Rule]:
    """The last rules of every set: each expert's remaining layers in ``fmt`` (W=A)."""
    return [Rule(f"re:{e}:.*", fmt, fmt) for e in experts]


def standard_sets(model, ranking, fmt: str = "hif4", top_ks=(2, 4), budgets=(0.3,), random_draws: int = 0,
                  protect_entrance: bool | None = None) -> list[ProtectedSet]:
    """None; the entrance; entrance + top-k (per k); sensq's budgeted plans; the entrance in one expert only;
    the family's published fixed set where it has one (Wan: ModelOpt's, the embedders, proj_out, the first
    and last three blocks) and sensq's plan at the same budget, left out for models of 6 blocks or fewer
    (the set would keep every block in high precision); and ``random_draws`` random sets per budget with the
    same share of parameters protected (seeded draws, the yardstick a ranking has to beat). sensq's plans are
    made as ``sensq plan`` makes them, with ``protect_entrance`` as given (the entrance first, then the
    ranking; or the ranking alone; ``None``: as ``sensq plan`` decides for this ranking)."""
    family = model.adapter
    experts = family.experts(model.pipe)
    everything = quantize_the_rest(experts, fmt)
    entrance = "(" + "|".join(family.entrance) + ")"
    n_blocks = len(family.block_list(family.expert_module(model.pipe, experts[0])))
    recipe = family.fixed_recipe(n_blocks)
    sets = [ProtectedSet("none", Plan(everything), "none"),
            ProtectedSet("entrance", Plan([Rule(f"re:({'|'.join(experts)}):{entrance}", None, None)] + everything),
                         "fixed")]
    for k in top_ks:
        sets.append(ProtectedSet(f"entrance + top-{k}", build_plan(ranking, top_k=k, fmt=fmt, protect_entrance=True)))
    for budget in budgets:
        sets.append(ProtectedSet(f"budget {budget:.0%}", build_plan(ranking, budget=budget, fmt=fmt,
                                                                    protect_entrance=protect_entrance)))
    for expert in experts if len(experts) > 1 else []:
        sets.append(ProtectedSet(f"entrance, {expert} only",
                                 Plan([Rule(f"re:{expert}:{entrance}", None, None)] + everything), "fixed"))
    if n_blocks > 6 and recipe is not None:
        recipe_name, pattern = recipe
        fixed = Plan([Rule(f"re:({'|'.join(experts)}):{pattern}", None, None)] + everything)
        sets.append(ProtectedSet(recipe_name, fixed, "fixed"))
        layers = model_layers(model)
        share = summarize(validate_plan(fixed, layers), layers)["total"]["protected_share"]
        sets.append(ProtectedSet(f"sensq at ModelOpt's budget ({share:.0%})",
                                 build_plan(ranking, budget=share, fmt=fmt, protect_entrance=protect_entrance)))
    for budget in budgets if n_blocks > 2 else ():
        edges = edge_blocks_plan(model, experts, budget, fmt)
        if any(rule.weight is None for rule in edges.rules):  # left out where no whole block fits the budget
            sets.append(ProtectedSet(f"first+last blocks {budget:.0%}", edges, "fixed"))
    for budget in budgets:
        for draw in range(random_draws):
            sets.append(ProtectedSet(f"random {budget:.0%} #{draw + 1}",
                                     random_plan(model, experts, budget, fmt, seed=draw), "random"))
    return sets


def edge_blocks_plan(model, experts: list[str], budget: float, fmt: str) -> Plan:
    """The fixed rule of several tools at a budget: per expert, whole blocks from both ends of the stack (first,
    last, second, second to last, ...) while they fit in ``budget`` of its parameters; nothing else."""
    family = model.adapter
    layers = model_layers(model)
    rules = []
    for expert in experts:
        own = [layer for layer in layers if layer.expert == expert]
        total = sum(layer.params for layer in own)
        sizes: dict[str, int] = {}
        for layer in own:
            block = family.block_of(layer.name)
            if block is not None:
                sizes[block] = sizes.get(block, 0) + layer.params
        n = len(sizes)
        order = [i for pair in zip(range(n), reversed(range(n)), strict=True) for i in pair]
        used = 0
        for index in dict.fromkeys(order[:n]):
            block = f"{family.blocks}.{index}"
            if used + sizes[block] > budget * total:
                break
            rules.append(Rule(f"re:{expert}:{re.escape(block)}\\..*", None, None, "first and last blocks"))
            used += sizes[block]
    return Plan(rules + quantize_the_rest(experts, fmt))


def plan_sets(model, paths: list[Path], fmt: str = "hif4") -> list[ProtectedSet]:
    """``none`` (every layer in ``fmt``, the yardstick) and each plan file as a set named after the file.

    Raises:
        InputError: a plan that cannot be read, two files with the same name.
    """
    experts = model.adapter.experts(model.pipe)
    sets = [ProtectedSet("none", Plan(quantize_the_rest(experts, fmt)), "none")]
    return sets + file_sets(paths, sets)


def file_sets(paths: list[Path], taken: list[ProtectedSet]) -> list[ProtectedSet]:
    """Each plan file as a set named after the file: ``ranked`` when sensq made it from a ranking (its source
    names one), else ``plan``.

    Raises:
        InputError: a plan that cannot be read, a name already taken.
    """
    sets: list[ProtectedSet] = []
    for path in paths:
        name = Path(path).stem
        if any(s.name == name for s in [*taken, *sets]):
            raise InputError(f"two sets would be named {name!r} ({str(path)!r}); rename one plan file")
        plan = Plan.load(path)
        sets.append(ProtectedSet(name, plan, "ranked" if (plan.source or {}).get("ranking_metric") else "plan"))
    return sets


def random_plan(model, experts: list[str], budget: float, fmt: str, seed: int) -> Plan:
    """Protect, per expert, layers drawn at random (seeded) while they fit in ``budget`` of its parameters."""
    import random

    rng = random.Random(seed)
    layers = model_layers(model)
    rules = []
    for expert in experts:
        own = [layer for layer in layers if layer.expert == expert]
        total = sum(layer.params for layer in own)
        used = 0
        for layer in rng.sample(own, len(own)):
            if used + layer.params <= budget * total:
                rules.append(Rule(f"{expert}:{layer.name}", None, None, f"random draw {seed}"))
                used += layer.params
    return Plan(rules + quantize_the_rest(experts, fmt))


SEED_STRIDE = 10007
"""Seed bases of an ablation's seed sets: ``trajectory.seed + k * SEED_STRIDE`` for ``k = 1 .. seeds`` (prompt ``i``
then uses base + i, as in every sensq generation), so that no two (prompt, seed) pairs of different sets collide
and none is one the probe (and so the ranking) ran: the probe's prompt ``i`` ran seed ``trajectory.seed + i``."""


def seed_bases(trajectory, seeds: int) -> list[int]:
    return [trajectory.seed + k * SEED_STRIDE for k in range(1, seeds + 1)]


def run_ablation(model, trajectory, prompts, sets: list[ProtectedSet], out: Path, **options) -> dict:
    """:func:`_run_ablation` holding ``out``'s lock (the one every sensq writer takes): a second ablation into the
    same folder is refused at once, not when it reaches a generation folder."""
    make_parent(Path(out))
    with output_lock(out):
        return _run_ablation(model, trajectory, prompts, sets, Path(out), **options)


def _run_ablation(model, trajectory, prompts, sets: list[ProtectedSet], out: Path, *, fmt: str, seeds: int = 1,
                 calibrate: str = "none", probe_path: Path | None = None, backend: str = "auto",
                 sequential_experts: bool = False, probe_from_another_model: bool = False,
                 pooled_experts: bool = False, write_video: bool = False,
                 progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Run every set over every prompt and seed (resuming what is done) and write ``ablation.json``.

    Each set is deployed exactly as ``sensq apply-plan`` deploys it, through the same function
    (:func:`sensq.quant.apply.apply_plan`: the same ``calibrate``, probe, ``backend``, ``sequential_experts``,
    ``pooled_experts`` and ``probe_from_another_model``), and generated as
    ``sensq generate`` generates; the round trip through a packed checkpoint gives bit-identical latents
    (tests/eval/test_ablate_demo.py checks a row against ``apply-plan`` + ``generate --model CKPT``).
    Scores are per generation (prompt x seed) against the full-precision generation of the same prompt and
    seed; means carry percentile-bootstrap 95% intervals and every set is compared, paired, with every
    other (:mod:`sensq.stats`).

    Raises:
        InputError: ``calibrate`` other than none without a probe file; a plan that does not fit the model.
    """
    from sensq.eval import evaluate_procedural, is_procedural
    from sensq.store.files import file_digest

    if calibrate not in CALIBRATIONS_WITHOUT_DATA and probe_path is None:
        raise InputError(f"--calibrate {calibrate} needs --probe PROBE.h5 (the captured inputs to calibrate on)")
    asking = [s.name for s in sets if any(r.calibration not in (None, *CALIBRATIONS_WITHOUT_DATA)
                                          for r in s.plan.rules)]
    if asking and probe_path is None:
        raise InputError(f"the plan's 'calibration' rules need --probe PROBE.h5 (the captured inputs to calibrate "
                         f"on); set {asking[0]!r} has them")
    out = claim_output_folder(out, "ablation.json", ABLATION_SCHEMA, "ablation folder")
    bases = seed_bases(trajectory, seeds)
    references = {}
    for base in bases:
        references[base] = out / "full-precision" / f"seed-{base}"
        generate(GenerateRequest(model, dataclasses.replace(trajectory, seed=base), prompts, references[base],
                                 label="full precision", write_video=write_video))
    procedural = is_procedural([p.text for p in prompts])
    deploy = {"calibrate": calibrate, "backend": backend,
              "probe_sha256": file_digest(probe_path, length=64) if probe_path is not None else None,
              **({"sequential_experts": True} if sequential_experts else {}),
              **({"probe_from_another_model": True} if probe_from_another_model else {}),
              **({"pooled_experts": True} if pooled_experts else {})}
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
        digest = f"{slug(protected.name)}:{hash_rules(protected.plan)}:{config_digest(deploy)}"
        requests = [GenerateRequest(model, dataclasses.replace(trajectory, seed=base), prompts, folder / f"seed-{base}",
                                    label=protected.name, plan_digest=digest, write_video=write_video)
                    for base in bases]
        if not all(generation_complete(request) for request in requests):
            apply_plan(model, protected.plan, probe_path=probe_path, calibrate=calibrate, backend=backend,
                       sequential_experts=sequential_experts, probe_from_another_model=probe_from_another_model,
                       pooled_experts=pooled_experts)
            try:
                for request in requests:
                    generate(request)
            finally:
                dequantize_(model)
        per_item: dict[str, dict[str, float]] = {}
        for base, request in zip(bases, requests, strict=True):
            scores = evaluate_fidelity(request.out, references[base])
            quality = _procedural_per_item(evaluate_procedural(request.out)) if procedural else {}
            for index, values in scores["per_item"].items():
                per_item[f"{index}@{base}"] = {**{m: values[m] for m in METRICS if m in values},
                                                **({"procedural": quality[index]} if procedural else {})}
        rows.append({
            "set": protected.name, "kind": protected.kind, "folder": str(folder.relative_to(out)),
            "rule_calibrations": sorted({r.calibration for r in protected.plan.rules if r.calibration}),
            "protected_share": {e: summary[e]["protected_share"] for e in summary if e != "total"},
            "protected_at_some_steps": {e: summary[e]["protected_at_some_steps_share"] for e in summary
                                        if e != "total"},
            "protected_layers": {e: summary[e]["by_precision"].get("high-precision", {"layers": 0})["layers"]
                                 for e in summary if e != "total"},
            "effective_bits": summary["total"]["effective_bits"],
            "weight_bytes": summary["total"]["weight_bytes_after"],
            "weight_bytes_bf16": summary["total"]["weight_bytes_before"],
            "real_size": summary_at_real_size(protected.plan, model.adapter),
            **_aggregate(per_item),
        })
        if progress is not None:
            progress(protected.name, position + 1, len(sets))
    reference_row = None
    if procedural:
        per_item = {}
        for base in bases:
            quality = _procedural_per_item(evaluate_procedural(references[base]))
            per_item.update({f"{index}@{base}": {"procedural": value} for index, value in quality.items()})
        reference_row = {"set": "full precision", **_aggregate(per_item)}
    result = {"schema": ABLATION_SCHEMA, "sensq_version": sensq.__version__, "format": fmt,
              "model": {"id": model.model_id, "fingerprint": model.fingerprint},
              "trajectory": trajectory.to_dict(), "prompts": [[p.index, p.text] for p in prompts], "seeds": bases,
              "held_out_seeds": True,
              "deploy": deploy, "reference": "full-precision/seed-<base>", "rows": rows,
              "reference_row": reference_row, "comparisons": compare_rows(rows, reference_row)}
    if procedural:
        result["reference_procedural"] = reference_row["metrics"]["procedural"]
    result["headline"] = headline(result)
    write_json(out / "ablation.json", result)
    return result


def generation_complete(request: GenerateRequest) -> bool:
    """True when ``request.out`` already holds every prompt of ``request`` for this very configuration."""
    from sensq.generate import MANIFEST, request_config

    path = request.out / MANIFEST
    if not path.is_file():
        return False
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        return False
    return (manifest.get("config_digest") == config_digest(request_config(request))
            and all(str(p.index) in manifest.get("items", {}) for p in request.prompts))


def _procedural_per_item(result: dict) -> dict[str, float]:
    from sensq.eval.procedural import DIMENSIONS

    return {index: float(np.mean([scores[d] for d in DIMENSIONS])) for index, scores in result["per_item"].items()}


def _aggregate(per_item: dict[str, dict[str, float]]) -> dict:
    """Per-metric mean, bootstrap interval and worst case over the generations, plus the values themselves
    (paired comparisons need them)."""
    keys = sorted({k for values in per_item.values() for k in values})
    metrics, intervals, worst = {}, {}, {}
    for key in keys:
        values = [values[key] for values in per_item.values() if key in values]
        interval = bootstrap_mean(values)
        metrics[key], intervals[key] = interval.mean, interval.to_dict()
        worst[key] = float(max(values) if key.endswith("nmse") else min(values))
    return {"metrics": metrics, "intervals": intervals, "worst": worst, "per_item": per_item}


def _paired(row_a: dict, row_b: dict, metric: str):
    items = sorted(set(row_a["per_item"]) & set(row_b["per_item"]))
    a = [row_a["per_item"][i].get(metric, math.nan) for i in items]
    b = [row_b["per_item"][i].get(metric, math.nan) for i in items]
    try:
        return paired_difference(a, b)
    except ValueError:
        return None


def compare_rows(rows: list[dict], reference_row: dict | None = None) -> list[dict]:
    """Every pair of sets, paired by generation, for latent NMSE (and the procedural score): the mean
    difference (first minus second), its 95% interval, and whether it is distinguishable from noise."""
    comparisons = []
    metrics = ("latent_nmse", "procedural")
    for i, a in enumerate(rows):
        for b in rows[i + 1:] + ([reference_row] if reference_row else []):
            for metric in metrics:
                if metric not in a["metrics"] or metric not in b["metrics"]:
                    continue
                interval = _paired(a, b, metric)
                if interval is None:
                    continue
                comparisons.append({"a": a["set"], "b": b["set"], "metric": metric, **interval.to_dict(),
                                    "significant": interval.excludes_zero})
    return comparisons


FIXED_SETS = ("entrance", "ModelOpt Wan recipe")
"""Sets that do not come from a ranking (what a user would protect without sensq)."""
BITS_SLACK = 0.01


def headline(result: dict) -> dict:
    """The recommendation a reader needs first: sensq's best ranked set (budget or top-k), its cost, and its
    gain over no protection and over the best fixed set that costs no more bits, with intervals."""
    rows = result["rows"]
    ranked = [r for r in rows if _kind(r) == "ranked"]
    if not ranked:
        return {}
    best = min(ranked, key=lambda r: (r["metrics"]["latent_nmse"], r["effective_bits"]))
    out = {"set": best["set"], "protected_layers": best["protected_layers"],
           "protected_share": best["protected_share"], "effective_bits": best["effective_bits"],
           "weight_gb": best["weight_bytes"] / 1e9, "weight_gb_bf16": best["weight_bytes_bf16"] / 1e9,
           "real_size": best["real_size"], "latent_nmse": best["intervals"]["latent_nmse"]}
    none = next((r for r in rows if r["set"] == "none"), None)
    if none is not None:
        gain = _paired(none, best, "latent_nmse")
        out["gain_over_none"] = gain.to_dict() | {"significant": gain.excludes_zero} if gain else None
    # "equal budget" with 1% slack: a budget walk cannot hit a fixed set's share exactly (8.22 vs 8.24 bits)
    fixed = _fixed_within(rows, best["effective_bits"])
    if fixed:
        rival = min(fixed, key=lambda r: r["metrics"]["latent_nmse"])
        gain = _paired(rival, best, "latent_nmse")
        out["best_fixed_set"] = rival["set"]
        out["gain_over_best_fixed"] = gain.to_dict() | {"significant": gain.excludes_zero} if gain else None
    out["per_budget"] = _per_budget(rows)
    return out


def _fixed_within(rows: list[dict], bits: float) -> list[dict]:
    """The fixed sets that cost no more than ``bits`` (with :data:`BITS_SLACK`)."""
    return [r for r in rows if _kind(r) == "fixed" and r["effective_bits"] <= bits * (1 + BITS_SLACK)]


def _kind(row: dict) -> str:
    """A row's set kind (ablations written before kinds were recorded: read from the set's name)."""
    if "kind" in row:
        return row["kind"]
    name = row["set"]
    if name == "none":
        return "none"
    if name.startswith(("budget", "entrance + top", "sensq at")):
        return "ranked"
    if name in FIXED_SETS or name.startswith("entrance, "):
        return "fixed"
    return "random" if name.startswith("random") else "plan"


def _per_budget(rows: list[dict]) -> list[dict]:
    """For each ranked set: the best fixed set that costs no more bits, and whether the ranked set beats it
    beyond noise (``won``: ranked, ``lost``: the fixed set, ``tie``: within noise)."""
    out = []
    for row in (r for r in rows if _kind(r) == "ranked"):
        fixed = _fixed_within(rows, row["effective_bits"])
        if not fixed:
            continue
        rival = min(fixed, key=lambda r: r["metrics"]["latent_nmse"])
        gain = _paired(rival, row, "latent_nmse")
        verdict = "tie" if gain is None or not gain.excludes_zero else ("won" if gain.mean > 0 else "lost")
        out.append({"set": row["set"], "fixed": rival["set"], "verdict": verdict,
                    "gain": gain.to_dict() if gain else None})
    return out


def hash_rules(plan: Plan) -> int:
    import zlib

    # a rule's calibration and step range join the tuple only when set: older ablation folders keep their digest
    return zlib.crc32(repr([(r.match, r.weight, r.activation, *([r.calibration] if r.calibration else []),
                             *([r.phase] if r.phase else [])) for r in plan.rules]).encode())


def load_ablation(folder: str | Path) -> dict:
    return read_json(Path(folder) / "ablation.json", ABLATION_SCHEMA, "ablation")


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
    from sensq.report import embedded_png, html_page, pyplot

    plt = pyplot()
    rows = result["rows"]
    if not rows:
        raise InputError("the ablation has no rows")
    if "intervals" not in rows[0]:
        raise InputError(f"{str(out)!r} holds an ablation written by an older sensq (no intervals); run sensq "
                         "ablate again into a new folder")
    result = {**result, "headline": headline(result)}  # from the rows: a re-rendered report follows the rules
    procedural = "procedural" in rows[0]["metrics"]
    files = []
    plot = out / "pareto_latent_nmse.png"
    _pareto_plot(plt, result, plot, "latent_nmse", "final-latent NMSE vs full precision")
    files.append(plot)
    if procedural:
        plot = out / "pareto_procedural.png"
        _pareto_plot(plt, result, plot, "procedural", "procedural evaluator average (higher is better)")
        files.append(plot)
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
    names, matrix = _significance_matrix(result)
    lines = headline_lines(result)
    n_items = rows[0]["intervals"]["latent_nmse"]["n"]
    own = {row["set"]: row["rule_calibrations"] for row in rows if row.get("rule_calibrations")}
    by_rule = ("; plan rules name their own in " + ", ".join(f"{name} ({'/'.join(c)})" for name, c in own.items())
               if own else "")
    note = (f"All metrics against the full-precision generation of the same prompt and seed ({n_items} generations: "
            f"{len(result['prompts'])} prompts x {len(result['seeds'])} seeds). Every variant is deployed as sensq "
            f"apply-plan deploys it (calibration {result['deploy']['calibrate']}{by_rule}; backend "
            f"{result['deploy']['backend']}). Intervals: percentile bootstrap of the mean, 95%, seeded.")
    md = [f"# sensq ablation: {result['format']} W4A4 on {result['model']['id']}", "",
          *[f"* {line}" for line in lines], "", note, "",
          "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
          *["| " + " | ".join(c.replace("\n", " ") for c in cells) + " |" for cells in table], "",
          *[f"![{p.stem}]({p.name})" for p in files], "",
          "## Which differences are distinguishable from noise (latent NMSE)", "",
          "`<`: the row's set has lower error than the column's beyond noise; `>` higher; `≈` within noise.", "",
          "| | " + " | ".join(str(i + 1) for i in range(len(names))) + " |", "|" + "---|" * (len(names) + 1),
          *[f"| {i + 1}: {name} | " + " | ".join(cells) + " |" for i, (name, cells) in enumerate(
              zip(names, matrix, strict=True))]]
    reproduce = "\n".join(commands or [])
    if reproduce:
        md += ["", "## Reproduce", "", "```bash", reproduce, "```"]
    title = f"sensq ablation: {result['format']} W4A4 on {result['model']['id']}"
    bold, strong = re.compile(r"\*\*(.+?)\*\*"), r"<b>\1</b>"
    headline_html = "<ul class='headline'>" + "".join(
        "<li>" + bold.sub(strong, html.escape(line)) + "</li>" for line in lines) + "</ul>"
    table_html = ("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td{' class=wrap' if i == 1 else ''}>{html.escape(c).replace(chr(10), '<br>')}</td>"
                         for i, c in enumerate(cells)) + "</tr>"
        for cells in table) + "</table>")
    matrix_html = ("<table><tr><th></th>" + "".join(f"<th>{i + 1}</th>" for i in range(len(names))) + "</tr>" + "".join(
        f"<tr><th style='text-align:left'>{i + 1}: {html.escape(name)}</th>" + "".join(
            f"<td style='text-align:center'>{html.escape(c)}</td>" for c in cells) + "</tr>"
        for i, (name, cells) in enumerate(zip(names, matrix, strict=True))) + "</table>")
    page = html_page(title, headline_html + f"<p>{html.escape(note)}</p>" + table_html
                     + "".join(embedded_png(p) for p in files)
                     + "<h2>Which differences are distinguishable from noise (latent NMSE)</h2><p><code>&lt;</code>: "
                       "the row's set has lower error than the column's beyond noise; <code>&gt;</code> higher; "
                       "<code>≈</code> within noise.</p>" + matrix_html
                     + (f"<h2>Reproduce</h2><pre>{html.escape(reproduce)}</pre>" if reproduce else ""))
    atomic_write_bytes(out / "ablation.md", ("\n".join(md) + "\n").encode())
    atomic_write_bytes(out / "ablation.html", page.encode())
    return [str(p) for p in files] + [str(out / "ablation.md"), str(out / "ablation.html")]
