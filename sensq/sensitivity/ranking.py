"""Rank the layers of each expert by sensitivity, from a probe file and the model's weights.

The ranking JSON (``sensq.ranking/1``) is what ``sensq plan`` and ``sensq report`` read.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import sensq
from sensq.errors import InputError
from sensq.formats import get_format
from sensq.metrics import DEFAULT_METRIC, METRICS
from sensq.models import LoadedModel
from sensq.sensitivity.e2e import GRANULARITIES, MODES, E2EJob, e2e_scores, layer_groups
from sensq.sensitivity.local import REDUCTIONS, layer_scores, reduce_steps
from sensq.store.files import file_digest, read_json, write_json
from sensq.store.probe_file import ProbeFile
from sensq.store.schema import Fields, ListOf, MapOf, validate_document
from sensq.trajectory import Trajectory

RANKING_SCHEMA = "sensq.ranking/1"

_LAYER_SPEC = Fields(
    required={"name": str, "kind": str, "params": int, "in_features": int, "out_features": int, "entrance": bool,
              "exit": bool, "value": MapOf(float), "rank": MapOf(int)},
    optional={"per_step": MapOf(ListOf(ListOf(float))), "members": ListOf(str),
              "member_layers": ListOf(Fields(required={"name": str, "kind": str, "params": int, "in_features": int}))},
)
_RANKING_SPEC = Fields(
    required={"schema": str, "metric": str, "reduce": str, "formats": ListOf(str),
              "experts": MapOf(ListOf(_LAYER_SPEC)),
              "steps": MapOf(ListOf(int)), "sigmas": MapOf(ListOf(float)), "branches": ListOf(str),
              "provenance": dict},
    optional={"mode": (str, None), "granularity": str, "agreement": dict, "validation": dict, "sensq_version": str},
    extra=True,
)


@dataclass
class LayerRank:
    """One layer (or block, for e2e with ``--granularity block``) of one expert."""

    name: str
    kind: str
    params: int
    in_features: int
    out_features: int
    entrance: bool
    exit: bool
    value: dict[str, float]
    """The reduced metric per format."""
    per_step: dict[str, list[list[float]]] = field(default_factory=dict)
    """``[step][branch]`` values per format (local metrics only)."""
    rank: dict[str, int] = field(default_factory=dict)
    """1 = most sensitive, per format."""
    members: list[str] = field(default_factory=list)
    """Layer names a block group stands for (empty for single layers)."""
    member_layers: list[dict] = field(default_factory=list)
    """Each member's ``name``, ``kind``, ``params`` and ``in_features`` (what a plan needs to expand the group)."""


@dataclass
class Ranking:
    metric: str
    reduce: str
    formats: list[str]
    experts: dict[str, list[LayerRank]]
    steps: dict[str, list[int]]
    sigmas: dict[str, list[float]]
    branches: list[str]
    provenance: dict
    mode: str | None = None
    granularity: str = "layer"
    agreement: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    """How this (local) ranking agrees with an e2e one, per expert (:mod:`sensq.sensitivity.validate`)."""
    schema: str = RANKING_SCHEMA
    sensq_version: str = sensq.__version__

    def ordered(self, expert: str, fmt: str | None = None) -> list[LayerRank]:
        """Layers of ``expert``, most sensitive first (by ``fmt``, default the first format)."""
        fmt = fmt or self.formats[0]
        return sorted(self.experts[expert], key=lambda layer: layer.rank[fmt])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write JSON atomically."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Ranking:
        """Raises InputError for a missing file, bad JSON, another schema, a document of the wrong shape
        (fields missing, unknown or of the wrong type, a layer without a value or rank per format), an empty
        ranking."""
        path = Path(path)
        data = validate_document(read_json(path, RANKING_SCHEMA, "ranking"), _RANKING_SPEC, path, "ranking")
        if not data["formats"]:
            raise InputError(f"{str(path)!r} is not a valid ranking: it names no format")
        for expert, layers in data["experts"].items():
            for layer in layers:
                for table in ("value", "rank"):
                    lacking = [f for f in data["formats"] if f not in layer[table]]
                    if lacking:
                        raise InputError(f"{str(path)!r} is not a valid ranking: {expert}:{layer['name']} has no "
                                         f"{table} for {lacking[0]!r}")
        experts = {e: [LayerRank(**layer) for layer in layers] for e, layers in data.pop("experts").items()}
        if not any(experts.values()):
            raise InputError(f"{str(path)!r} ranks no layer (empty ranking)")
        known = {f.name for f in dataclasses.fields(cls)} - {"experts"}
        return cls(experts=experts, **{k: v for k, v in data.items() if k in known})


def _assign_ranks(layers: list[LayerRank], formats: list[str], metric: str) -> None:
    sign = -1.0 if METRICS[metric].higher_is_more_sensitive else 1.0
    for fmt in formats:
        # NaN sorts last; ties keep the model's layer order (stable sort): deterministic
        def key(layer, fmt=fmt):
            value = layer.value[fmt]
            return (math.isnan(value), sign * value if not math.isnan(value) else 0.0)
        for position, layer in enumerate(sorted(layers, key=key)):
            layer.rank[fmt] = position + 1


def _agreement(layers: list[LayerRank], formats: list[str], top: int = 10) -> dict:
    """Spearman correlation and top-k overlap between the rankings of each pair of formats."""
    from scipy.stats import spearmanr

    out = {}
    for i, a in enumerate(formats):
        for b in formats[i + 1:]:
            ranks_a = [layer.rank[a] for layer in layers]
            ranks_b = [layer.rank[b] for layer in layers]
            top_a = {layer.name for layer in layers if layer.rank[a] <= top}
            top_b = {layer.name for layer in layers if layer.rank[b] <= top}
            rho = spearmanr(ranks_a, ranks_b).statistic if len(layers) > 1 else 1.0
            moved = sorted(layers, key=lambda layer, a=a, b=b: -abs(layer.rank[a] - layer.rank[b]))[:5]
            out[f"{a} vs {b}"] = {
                "spearman": float(rho), f"top{top}_overlap": len(top_a & top_b),
                "largest_moves": [{"layer": m.name, a: m.rank[a], b: m.rank[b]} for m in moved],
            }
    return out


@dataclass(frozen=True)
class RankRequest:
    probe_path: Path
    model: LoadedModel
    formats: list[str]
    metric: str = DEFAULT_METRIC
    reduce: str = "mean"
    experts: list[str] | None = None
    mode: str = "leave-one-in"
    granularity: str = "layer"
    limit: int | None = None
    force: bool = False
    backend: str = "auto"
    projections: int = 8
    """Random projections per prompt of the propagated metrics (``grad-e2e``, ``grad-step``)."""
    checkpoint: bool = False
    """Propagated metrics: recompute checkpointed expert calls and blocks in the backward passes."""


def validate(request: RankRequest) -> None:
    if request.metric not in METRICS:
        raise InputError(f"unknown metric {request.metric!r}; use one of {', '.join(METRICS)}")
    if request.reduce not in REDUCTIONS:
        raise InputError(f"unknown reduction {request.reduce!r}; use one of {', '.join(REDUCTIONS)}")
    if request.mode not in MODES:
        raise InputError(f"unknown mode {request.mode!r}; use one of {', '.join(MODES)}")
    if request.granularity not in GRANULARITIES:
        raise InputError(f"unknown granularity {request.granularity!r}; use one of {', '.join(GRANULARITIES)}")
    if request.granularity == "block" and METRICS[request.metric].operand != "latents":
        raise InputError(f"--granularity block needs --metric e2e ({request.metric} scores single layers)")
    if request.projections < 1:
        raise InputError(f"--projections must be at least 1, got {request.projections}")
    if not request.formats:
        raise InputError("--format needs at least one format")
    for name in request.formats:
        get_format(name)


def require_probed_model(probe: ProbeFile, path, model, advice: str) -> None:
    """Refuse (one line) a probe recorded on another model than ``model`` (its weights' fingerprint)."""
    if probe.model_fingerprint != model.fingerprint:
        raise InputError(
            f"{str(path)!r} was probed on model {probe.model_id!r} (fingerprint "
            f"{probe.model_fingerprint}) but --model {model.model_id!r} has fingerprint {model.fingerprint}; "
            + (f"it was probed with LoRAs {probe.loras}: pass the same --lora-high/--lora-low, "
               if probe.loras != model.loras else "") + advice)


def rank_layers(request: RankRequest, progress: Callable[[str, int, int], None] | None = None) -> Ranking:
    """Rank every probed layer of each expert.

    Raises:
        InputError: bad options, a probe from another model (unless ``force``), an unknown expert.
    """
    validate(request)
    formats = [get_format(name) for name in request.formats]
    model = request.model
    started = time.perf_counter()
    with ProbeFile(request.probe_path) as probe:
        if not request.force:
            require_probed_model(probe, request.probe_path, model, "rank with the same model, or pass --force")
        experts = request.experts or probe.experts
        for expert in experts:
            if expert not in probe.experts:
                raise InputError(f"expert {expert!r} is not in {str(request.probe_path)!r} (it has "
                                 f"{', '.join(probe.experts)})")
            if not probe.layers(expert):
                others = [e for e in experts if e != expert]
                raise InputError(f"the {expert!r} expert of {str(request.probe_path)!r} holds no layer table (it ran "
                                 "at no step, or the file was damaged): "
                                 + (f"rank the others with --expert {others[0]}" if others else "probe again"))
        # recorded outputs are the full-precision reference only for the model that produced them
        same_model = probe.model_fingerprint == model.fingerprint
        use_outputs = {e: same_model and METRICS[request.metric].operand == "output"
                       and probe.has_outputs(e)
                       for e in experts}
        table = probe.trajectory_table()
        sigma_of = {row["step"]: row["sigma"] for row in table}
        ranked: dict[str, list[LayerRank]] = {}
        steps = {e: [int(s) for s in probe.steps(e)] for e in experts}
        sigmas = {e: [sigma_of[s] for s in steps[e]] for e in experts}
        if METRICS[request.metric].propagated:  # every expert in one pass
            ranked = _rank_propagated(request, probe, model, experts, formats, steps, sigmas, progress)
        for expert in () if METRICS[request.metric].propagated else experts:
            expert_module = model.family.expert_module(model.pipe, expert)
            if METRICS[request.metric].local:
                ranked[expert] = _rank_local(request, probe, expert, expert_module, formats,
                                             np.array(sigmas[expert]), use_outputs[expert], progress)
            else:
                ranked[expert] = _rank_e2e(request, probe, model, expert, expert_module, probe.layers(expert),
                                           formats, progress)
        for layers in ranked.values():
            _assign_ranks(layers, request.formats, request.metric)
        provenance = _provenance(request, probe, any(use_outputs.values()), time.perf_counter() - started)
        ranking = Ranking(
            metric=request.metric, reduce=request.reduce, formats=list(request.formats), experts=ranked,
            steps=steps, sigmas=sigmas, branches=probe.branches, provenance=provenance,
            mode=request.mode if METRICS[request.metric].operand == "latents" else None,
            granularity=request.granularity,
        )
    if len(request.formats) > 1:
        ranking.agreement = {e: _agreement(layers, request.formats) for e, layers in ranked.items()}
    return ranking


def _rank_local(request: RankRequest, probe, expert: str, expert_module, formats, sigmas: np.ndarray,
                use_outputs: bool, progress) -> list[LayerRank]:
    """Every probed layer of one expert scored by a local metric, reduced over steps."""
    family = request.model.family
    layer_names = probe.layers(expert)
    layers = []
    for i, name in enumerate(layer_names):
        info = probe.layer_attrs(expert, name)
        recorded = probe.read(expert, name, "outputs") if use_outputs else None
        scores = layer_scores(expert_module.get_submodule(name), probe.read(expert, name, "samples"),
                              formats, request.metric, request.backend, outputs=recorded)
        layers.append(_probed_layer(family, name, info, {f: reduce_steps(v, sigmas, request.reduce)
                                                         for f, v in scores.per_step.items()}, scores.per_step))
        if progress is not None:
            progress(expert, i + 1, len(layer_names))
    return layers


def _probed_layer(family, name: str, info: dict, value: dict[str, float], per_step: dict[str, np.ndarray]) -> LayerRank:
    """One probed layer's entry: its shape from the probe file (``info``), its role from the family."""
    return LayerRank(name=name, kind=info["kind"], params=info["params"], in_features=info["in_features"],
                     out_features=info["out_features"], entrance=family.is_entrance(name), exit=family.is_exit(name),
                     value=value, per_step={f: v.tolist() for f, v in per_step.items()})


def _provenance(request: RankRequest, probe, used_outputs: bool, seconds: float) -> dict:
    model = request.model
    return {
        "probe_file": str(request.probe_path), "probe_sha256": file_digest(request.probe_path, length=64),
        "probe_model_fingerprint": probe.model_fingerprint, "model_id": model.model_id,
        "family": model.family.name, "model_fingerprint": model.fingerprint, "loras": dict(model.loras),
        "reference": "recorded outputs" if used_outputs else "recomputed from the samples",
        "trajectory": probe.attr_json("trajectory"), "prompts": int(probe.done.sum()), "seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def probe_job(probe, limit: int | None) -> E2EJob:
    """The probe's own trajectory, prompts, seeds and negatives (the first ``limit`` finished prompts)."""
    done = np.flatnonzero(probe.done)
    if limit is not None:
        done = done[:limit]
    return E2EJob(
        trajectory=Trajectory.from_dict(probe.attr_json("trajectory")),
        prompts=[probe.prompts[i] for i in done],
        seeds=[int(s) for s in probe.file["prompts/seed"][done]],
        negatives=[probe.negatives[i] for i in done],
    )


def _rank_propagated(request, probe, model, experts, formats, steps, sigmas, progress) -> dict[str, list[LayerRank]]:
    """Every probed layer of every expert, from one pass per prompt (:mod:`sensq.sensitivity.propagated`)."""
    from sensq.sensitivity.propagated import propagated_scores

    family = model.family
    job = probe_job(probe, request.limit)
    modules = {e: family.expert_module(model.pipe, e) for e in experts}
    scores = {}
    for fmt in formats:
        scores[fmt.identity] = propagated_scores(
            model.pipe, modules, job, fmt, family=family, metric=request.metric, projections=request.projections,
            backend=request.backend, checkpoint=request.checkpoint,
            progress=None if progress is None else (lambda i, n: progress(f"{request.metric}", i, n)))
    ranked = {}
    for expert in experts:
        layers = []
        for name in probe.layers(expert):
            info = probe.layer_attrs(expert, name)
            per_step = {f: scores[f][expert][name][1][steps[expert]] for f in scores}
            if request.metric == "grad-e2e":
                value = {f: scores[f][expert][name][0] for f in scores}
            else:
                value = {f: reduce_steps(per_step[f], np.array(sigmas[expert]), request.reduce) for f in scores}
            layers.append(_probed_layer(family, name, info, value, per_step))
        ranked[expert] = layers
    return ranked


def _rank_e2e(request, probe, model, expert, expert_module, layer_names, formats, progress) -> list[LayerRank]:
    job = probe_job(probe, request.limit)
    values = {}
    for fmt in formats:
        values[fmt.identity] = e2e_scores(
            model.pipe, expert_module, layer_names, job, fmt, family=model.family, mode=request.mode,
            granularity=request.granularity, backend=request.backend,
            progress=None if progress is None else (lambda i, n: progress(f"{expert} e2e", i, n)),
        )
    layers = []
    for group, members in layer_groups(layer_names, request.granularity, model.family):
        infos = [probe.layer_attrs(expert, name) for name in members]
        layers.append(LayerRank(
            name=group, kind=infos[0]["kind"] if len(infos) == 1 else "block",
            params=sum(i["params"] for i in infos), in_features=infos[0]["in_features"],
            out_features=infos[-1]["out_features"],
            entrance=all(model.family.is_entrance(n) for n in members),
            exit=all(model.family.is_exit(n) for n in members),
            value={f: values[f][group] for f in values}, members=members if len(members) > 1 else [],
            member_layers=[{"name": n, "kind": i["kind"], "params": int(i["params"]),
                            "in_features": int(i["in_features"])} for n, i in zip(members, infos, strict=True)]
            if len(members) > 1 else [],
        ))
    return layers
