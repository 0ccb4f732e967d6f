"""Protected-set ablation: for each protected set, quantize, generate, evaluate against full precision.

Every set uses the same format and the same prompts, seeds and trajectory as the full-precision run.
Results land in one folder (resumable: generations resume, scores are recomputed) with a JSON
table and a Markdown + self-contained HTML report.
"""

from __future__ import annotations

import dataclasses
import json
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
    Plan,
    Rule,
    build_plan,
    model_layers,
    summarize,
    summary_at_real_size,
    validate_plan,
)
from sensq.plan.calibrations import needs_data
from sensq.quant import dequantize_
from sensq.report.ablation import (  # noqa: F401 (the ablation's statistics and report, re-exported)
    ABLATION_SCHEMA,
    METRICS,
    SET_KINDS,
    SetKind,
    aggregate,
    compare_rows,
    headline,
    headline_lines,
    interval_text,
    kept_text,
    load_ablation,
    write_ablation_report,
)
from sensq.store.files import (
    claim_output_folder,
    make_parent,
    output_lock,
    write_json,
)
from sensq.workflows import apply_plan


@dataclass(frozen=True)
class ProtectedSet:
    name: str
    plan: Plan
    kind: SetKind = SetKind.RANKED

    def __post_init__(self):
        try:
            object.__setattr__(self, "kind", SetKind(self.kind))
        except ValueError:
            raise ValueError(f"unknown set kind {self.kind!r}; use one of {', '.join(SET_KINDS)}") from None


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
    family = model.family
    experts = family.experts(model.pipe)
    everything = quantize_the_rest(experts, fmt)
    n_blocks = len(family.block_list(family.expert_module(model.pipe, experts[0])))
    recipe = family.fixed_recipe(n_blocks)
    sets = [ProtectedSet("none", Plan(everything), "none"),
            ProtectedSet("entrance", Plan([Rule(family.entrance_rule(experts), None, None)] + everything),
                         "fixed")]
    for k in top_ks:
        sets.append(ProtectedSet(f"entrance + top-{k}", build_plan(ranking, top_k=k, fmt=fmt, protect_entrance=True)))
    for budget in budgets:
        sets.append(ProtectedSet(f"budget {budget:.0%}", build_plan(ranking, budget=budget, fmt=fmt,
                                                                    protect_entrance=protect_entrance)))
    for expert in experts if len(experts) > 1 else []:
        sets.append(ProtectedSet(f"entrance, {expert} only",
                                 Plan([Rule(family.entrance_rule([expert]), None, None)] + everything), "fixed"))
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
    family = model.family
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
    experts = model.family.experts(model.pipe)
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
        params = {layer.name: layer.params for layer in own}
        for name in fill_budget([layer.name for layer in rng.sample(own, len(own))], params, budget * total):
            rules.append(Rule(f"{expert}:{name}", None, None, f"random draw {seed}"))
    return Plan(rules + quantize_the_rest(experts, fmt))


def fill_budget(order: list[str], params: dict[str, int], budget: float) -> list[str]:
    """The layers of ``order`` taken in turn while they fit in ``budget`` parameters (a layer that does not fit
    is skipped, later smaller ones may still be taken)."""
    chosen, used = [], 0
    for name in order:
        if used + params[name] <= budget:
            chosen.append(name)
            used += params[name]
    return chosen


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
    (:func:`sensq.workflows.apply_plan`: the same ``calibrate``, probe, ``backend``, ``sequential_experts``,
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

    if needs_data(calibrate) and probe_path is None:
        raise InputError(f"--calibrate {calibrate} needs --probe PROBE.h5 (the captured inputs to calibrate on)")
    asking = [s.name for s in sets if any(needs_data(r.calibration)
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
        plan = dataclasses.replace(protected.plan, layers=table, summary=summary)  # the caller's plan stays as it is
        plan.save(folder / "plan.json")
        digest = f"{slug(protected.name)}:{hash_rules(plan)}:{config_digest(deploy)}"
        requests = [GenerateRequest(model, dataclasses.replace(trajectory, seed=base), prompts, folder / f"seed-{base}",
                                    label=protected.name, plan_digest=digest, write_video=write_video)
                    for base in bases]
        if not all(generation_complete(request) for request in requests):
            apply_plan(model, plan, probe_path=probe_path, calibrate=calibrate, backend=backend,
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
            "set": protected.name, "kind": protected.kind.value, "folder": str(folder.relative_to(out)),
            "rule_calibrations": sorted({r.calibration for r in plan.rules if r.calibration}),
            "protected_share": {e: summary[e]["protected_share"] for e in summary if e != "total"},
            "protected_at_some_steps": {e: summary[e]["protected_at_some_steps_share"] for e in summary
                                        if e != "total"},
            "protected_layers": {e: summary[e]["by_precision"].get("high-precision", {"layers": 0})["layers"]
                                 for e in summary if e != "total"},
            "effective_bits": summary["total"]["effective_bits"],
            "weight_bytes": summary["total"]["weight_bytes_after"],
            "weight_bytes_bf16": summary["total"]["weight_bytes_before"],
            "real_size": summary_at_real_size(plan, model.family),
            **aggregate(per_item),
        })
        if progress is not None:
            progress(protected.name, position + 1, len(sets))
    reference_row = None
    if procedural:
        per_item = {}
        for base in bases:
            quality = _procedural_per_item(evaluate_procedural(references[base]))
            per_item.update({f"{index}@{base}": {"procedural": value} for index, value in quality.items()})
        reference_row = {"set": "full precision", **aggregate(per_item)}
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


def hash_rules(plan: Plan) -> int:
    import zlib

    # a rule's calibration and step range join the tuple only when set: older ablation folders keep their digest
    return zlib.crc32(repr([(r.match, r.weight, r.activation, *([r.calibration] if r.calibration else []),
                             *([r.phase] if r.phase else [])) for r in plan.rules]).encode())


