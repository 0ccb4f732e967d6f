"""Running an ablation: for each protected set, quantize as ``apply-plan`` does, generate as ``generate`` does,
score against the full-precision generation of the same prompt and seed.

Every set uses the same format and the same prompts, seeds and trajectory as the full-precision run.
Results land in one folder (resumable: generations resume, scores are recomputed) as ``ablation.json``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

import sensq
from sensq.ablate.sets import ProtectedSet, slug
from sensq.ablate.statistics import ABLATION_SCHEMA, METRICS, aggregate, compare_rows, headline
from sensq.errors import InputError
from sensq.eval import evaluate_fidelity
from sensq.generate import GenerateRequest, config_digest, generate
from sensq.plan import Plan, model_layers, summarize, summary_at_real_size, validate_plan
from sensq.plan.calibrations import needs_data
from sensq.quant import dequantize_
from sensq.store.files import claim_output_folder, make_parent, output_lock, write_json
from sensq.workflows import apply_plan

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
    from sensq.eval import is_procedural
    from sensq.store.files import file_digest

    _require_probe(calibrate, probe_path, sets)
    out = claim_output_folder(out, "ablation.json", ABLATION_SCHEMA, "ablation folder")
    bases = seed_bases(trajectory, seeds)
    references = {base: out / "full-precision" / f"seed-{base}" for base in bases}
    for base in bases:
        generate(GenerateRequest(model, dataclasses.replace(trajectory, seed=base), prompts, references[base],
                                 label="full precision", write_video=write_video))
    deploy = {"calibrate": calibrate, "backend": backend,
              "probe_sha256": file_digest(probe_path, length=64) if probe_path is not None else None,
              **({"sequential_experts": True} if sequential_experts else {}),
              **({"probe_from_another_model": True} if probe_from_another_model else {}),
              **({"pooled_experts": True} if pooled_experts else {})}
    run = _Run(model, trajectory, prompts, out, references, deploy, is_procedural([p.text for p in prompts]),
               model_layers(model), write_video,
               {"probe_path": probe_path, "calibrate": calibrate, "backend": backend,
                "sequential_experts": sequential_experts, "probe_from_another_model": probe_from_another_model,
                "pooled_experts": pooled_experts})
    rows = []
    for position, protected in enumerate(sets):
        if progress is not None:
            progress(protected.name, position, len(sets))
        rows.append(run.measure(protected))
        if progress is not None:
            progress(protected.name, position + 1, len(sets))
    reference_row = run.reference_row()
    procedural = reference_row is not None
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


def _require_probe(calibrate: str, probe_path, sets: list[ProtectedSet]) -> None:
    """Raises InputError when a calibration that needs captured inputs (the default or a rule's) has no probe."""
    if needs_data(calibrate) and probe_path is None:
        raise InputError(f"--calibrate {calibrate} needs --probe PROBE.h5 (the captured inputs to calibrate on)")
    asking = [s.name for s in sets if any(needs_data(r.calibration) for r in s.plan.rules)]
    if asking and probe_path is None:
        raise InputError(f"the plan's 'calibration' rules need --probe PROBE.h5 (the captured inputs to calibrate "
                         f"on); set {asking[0]!r} has them")


@dataclasses.dataclass
class _Run:
    """What every set of one ablation shares: the model, trajectory and prompts, the folder, the full-precision
    references by seed base, how sets are deployed (``deploy`` as recorded, ``apply`` as passed to apply_plan)."""

    model: object
    trajectory: object
    prompts: list
    out: Path
    references: dict[int, Path]
    deploy: dict
    procedural: bool
    layers: list
    write_video: bool
    apply: dict

    def measure(self, protected: ProtectedSet) -> dict:
        """Deploy ``protected`` as apply-plan does, generate every prompt x seed (what is not done yet), score."""
        table = validate_plan(protected.plan, self.layers)
        summary = summarize(table, self.layers)
        folder = self.out / "sets" / slug(protected.name)
        folder.mkdir(parents=True, exist_ok=True)
        plan = dataclasses.replace(protected.plan, layers=table, summary=summary)  # the caller's plan stays as is
        plan.save(folder / "plan.json")
        digest = f"{slug(protected.name)}:{hash_rules(plan)}:{config_digest(self.deploy)}"
        requests = [GenerateRequest(self.model, dataclasses.replace(self.trajectory, seed=base), self.prompts,
                                    folder / f"seed-{base}", label=protected.name, plan_digest=digest,
                                    write_video=self.write_video) for base in self.references]
        if not all(generation_complete(request) for request in requests):
            apply_plan(self.model, plan, **self.apply)
            try:
                for request in requests:
                    generate(request)
            finally:
                dequantize_(self.model)
        return _row(protected, plan, summary, str(folder.relative_to(self.out)), self.model.family,
                    self.scores([request.out for request in requests]))

    def scores(self, folders: list[Path]) -> dict[str, dict[str, float]]:
        """Per generation (``index@base``), each metric against the full-precision one (+ the procedural score)."""
        from sensq.eval import evaluate_procedural

        per_item: dict[str, dict[str, float]] = {}
        for (base, reference), folder in zip(self.references.items(), folders, strict=True):
            fidelity = evaluate_fidelity(folder, reference)
            quality = _procedural_per_item(evaluate_procedural(folder)) if self.procedural else {}
            for index, values in fidelity["per_item"].items():
                per_item[f"{index}@{base}"] = {**{m: values[m] for m in METRICS if m in values},
                                                **({"procedural": quality[index]} if self.procedural else {})}
        return per_item

    def reference_row(self) -> dict | None:
        """The full-precision generations' own procedural scores (procedural prompts only)."""
        from sensq.eval import evaluate_procedural

        if not self.procedural:
            return None
        per_item = {}
        for base, reference in self.references.items():
            quality = _procedural_per_item(evaluate_procedural(reference))
            per_item.update({f"{index}@{base}": {"procedural": value} for index, value in quality.items()})
        return {"set": "full precision", **aggregate(per_item)}


def _row(protected: ProtectedSet, plan: Plan, summary: dict, folder: str, family, per_item: dict) -> dict:
    experts = [e for e in summary if e != "total"]
    return {
        "set": protected.name, "kind": protected.kind.value, "folder": folder,
        "rule_calibrations": sorted({r.calibration for r in plan.rules if r.calibration}),
        "protected_share": {e: summary[e]["protected_share"] for e in experts},
        "protected_at_some_steps": {e: summary[e]["protected_at_some_steps_share"] for e in experts},
        "protected_layers": {e: summary[e]["by_precision"].get("high-precision", {"layers": 0})["layers"]
                             for e in experts},
        "effective_bits": summary["total"]["effective_bits"],
        "weight_bytes": summary["total"]["weight_bytes_after"],
        "weight_bytes_bf16": summary["total"]["weight_bytes_before"],
        "real_size": summary_at_real_size(plan, family),
        **aggregate(per_item),
    }


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


