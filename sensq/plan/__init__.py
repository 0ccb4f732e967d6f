"""Mixed-precision plans (``sensq.plan/1``): which layers of which expert keep high precision.

A plan is an ordered list of rules ``{match, weight, activation}``. ``match`` is an
expert-qualified layer name (``high:blocks.0.attn1.to_q``) or a regex over the same
(``re:low:blocks\\.3[0-9]\\..*``); the first rule that matches a layer decides its formats; a
``null`` format keeps that operand in high precision. A rule that matches no layer is an error.
The plan file also carries the resolved per-layer table (for audit) and a summary.

``re:`` rules are matched with RE2 (google-re2): linear time in the layer name whatever the pattern,
so a plan from someone else cannot stall sensq with catastrophic backtracking (``(.*.*.*)*X``).
RE2 has no look-around or back-references; layer patterns never need them.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import sensq
from sensq.errors import InputError
from sensq.formats import get_format
from sensq.models import ModelFamily, get_family
from sensq.models.family import recorded_family
from sensq.models.layers import LayerInfo, layer_infos
from sensq.plan.calibrations import METHODS
from sensq.store.files import read_json, write_json
from sensq.store.schema import Fields, ListOf, validate_document

PLAN_SCHEMA = "sensq.plan/1"
HIGH_PRECISION_BITS = 16  # protected layers stay in the model's bf16
MAX_PATTERN_LENGTH = 2000

CALIBRATIONS = tuple(METHODS)
"""How a rule's layers are calibrated (``calibration`` field): the registered methods
(:mod:`sensq.plan.calibrations`; implemented in :mod:`sensq.quant.calibrate`)."""
CALIBRATIONS_WITHOUT_DATA = tuple(name for name, method in METHODS.items() if not method.needs_data)
"""The built-in calibrations that need no captured inputs (code checks :func:`~sensq.plan.calibrations.needs_data`,
which also knows methods registered later)."""

_RULE_SPEC = Fields(required={"match": str}, optional={"weight": (str, None), "activation": (str, None), "why": str,
                                                        "calibration": (str, None), "steps": list, "sigma": list})
_PLAN_SPEC = Fields(
    required={"schema": str, "rules": ListOf(_RULE_SPEC)},
    optional={"sensq_version": str, "model": dict, "source": dict, "layers": ListOf(dict), "summary": dict},
    extra=True,
)


@functools.lru_cache(maxsize=4096)
def compile_pattern(pattern: str):
    """A layer-name pattern compiled with RE2 (linear-time matching, bounded memory).

    Raises:
        InputError: too long, not valid RE2 syntax (look-around, back-references), or too large.
    """
    import re2

    if len(pattern) > MAX_PATTERN_LENGTH:
        raise InputError(f"regex {pattern[:40]!r}... is {len(pattern)} characters long; layer patterns are limited "
                         f"to {MAX_PATTERN_LENGTH}")
    options = re2.Options()
    options.log_errors = False
    options.max_mem = 8 << 20
    try:
        return re2.compile(pattern, options=options)
    except re2.error as error:
        reason = error.args[0].decode(errors="replace") if error.args and isinstance(error.args[0], bytes) else error
        raise InputError(f"regex {pattern!r} is not valid (RE2 syntax: no look-around or back-references): "
                         f"{reason}") from None


def _range(match: str, key: str, value) -> tuple[float, float]:
    import math

    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            or value[0] > value[1]):
        raise InputError(f"rule {match!r}: {key!r} must be [low, high] with finite numbers, low <= high; got {value!r}")
    return float(value[0]), float(value[1])


@dataclass(frozen=True)
class Rule:
    match: str
    weight: str | None
    activation: str | None
    why: str = ""
    calibration: str | None = None
    """None: the method apply-plan is given (``--calibrate``); else one of :data:`CALIBRATIONS`."""

    steps: tuple[int, int] | None = None
    """Only at these denoising steps (0-based, both ends included, counted over the whole trajectory)."""
    sigma: tuple[float, float] | None = None
    """Only at steps whose noise level sigma (timestep / 1000 for flow matching) is in this range, both ends
    included."""

    def __post_init__(self):
        if self.calibration is not None and self.calibration not in METHODS:
            raise InputError(f"rule {self.match!r}: unknown calibration {self.calibration!r}; use one of "
                             f"{', '.join(METHODS)} (or leave it out to use apply-plan's --calibrate)")
        if self.steps is not None and self.sigma is not None:
            raise InputError(f"rule {self.match!r} has both 'steps' and 'sigma'; give one range")
        if self.steps is not None:
            lo, hi = _range(self.match, "steps", self.steps)
            if lo != int(lo) or hi != int(hi) or lo < 0:
                raise InputError(f"rule {self.match!r}: 'steps' must be two step indices >= 0, got {list(self.steps)}")
            object.__setattr__(self, "steps", (int(lo), int(hi)))
        if self.sigma is not None:
            object.__setattr__(self, "sigma", _range(self.match, "sigma", self.sigma))

    @property
    def phase(self) -> dict | None:
        """``{"steps": [a, b]}`` or ``{"sigma": [lo, hi]}`` for a rule with a range, else None."""
        if self.steps is not None:
            return {"steps": list(self.steps)}
        return {"sigma": list(self.sigma)} if self.sigma is not None else None

    def to_dict(self) -> dict:
        return {"match": self.match, "weight": self.weight, "activation": self.activation,
                **({"why": self.why} if self.why else {}),
                **({"calibration": self.calibration} if self.calibration else {}), **(self.phase or {})}

    def matches(self, expert: str, layer: str) -> bool:
        qualified = f"{expert}:{layer}"
        if self.match.startswith("re:"):
            return compile_pattern(self.match[3:]).fullmatch(qualified) is not None
        return self.match == qualified


def resolve(rules: list[Rule], layers: list[LayerInfo]) -> tuple[list[dict], list[int]]:
    """Apply the rules (first match wins) to every layer.

    Returns:
        The per-layer table, and the indices of rules that matched no layer.

    Raises:
        InputError: a layer that no rule matches (a plan must decide every layer), a bad regex.
    """
    for rule in rules:
        if rule.match.startswith("re:"):
            compile_pattern(rule.match[3:])
    used = [False] * len(rules)
    table = []
    for layer in layers:
        phases = []
        for index, rule in enumerate(rules):
            if not rule.matches(layer.expert, layer.name):
                continue
            used[index] = True
            if rule.phase is not None:  # decides only inside its range; later rules decide the other steps
                phases.append({**rule.phase, "weight": rule.weight, "activation": rule.activation, "rule": index})
                continue
            table.append({"expert": layer.expert, "layer": layer.name, "weight": rule.weight,
                          "activation": rule.activation, "params": layer.params, "kind": layer.kind,
                          "rule": index, **({"calibration": rule.calibration} if rule.calibration else {}),
                          **({"phases": phases} if phases else {})})
            break
        else:
            raise InputError(f"no rule of the plan matches {layer.expert}:{layer.name}"
                             f"{' outside its step ranges' if phases else ''}; add a catch-all rule "
                             f"such as 're:{layer.expert}:.*'")
    return table, [i for i, hit in enumerate(used) if not hit]


def resident_bits(row: dict, in_features: int) -> float:
    """Bits per weight a resolved row keeps resident: its format's, or, for a layer whose precision changes
    with the step (``phases``), the sum over the distinct weights it holds (each phase's format and the
    base's; high precision counts 16): both are deployed, neither is re-derived from the other."""
    formats = {row["weight"]} | {phase["weight"] for phase in row.get("phases", ())}
    return sum(HIGH_PRECISION_BITS if f is None else get_format(f).bits_per_element(in_features) for f in formats)


def protected_range(row: dict) -> str | None:
    """For a resolved row quantized by its plan except at some steps, where a rule with a range keeps it in high
    precision: that range as text (``steps 0-1``, ``sigma 0-0.25``; the first such rule's); else None."""
    if row["weight"] is None:
        return None
    for phase in row.get("phases", ()):
        if phase["weight"] is None:
            key = "steps" if "steps" in phase else "sigma"
            return f"{key} {phase[key][0]:g}-{phase[key][1]:g}"
    return None


def summarize(table: list[dict], layers: list[LayerInfo]) -> dict:
    """Layers and parameters per precision, effective bits per parameter, weight bytes before/after."""
    width = {(layer.expert, layer.name): layer.in_features for layer in layers}
    out: dict[str, dict] = {}
    for scope in sorted({row["expert"] for row in table}) + ["total"]:
        rows = [row for row in table if scope in ("total", row["expert"])]
        by_precision: dict[str, dict[str, int]] = {}
        bits = 0.0
        for row in rows:
            key = row["weight"] or "high-precision"
            entry = by_precision.setdefault(key, {"layers": 0, "params": 0})
            entry["layers"] += 1
            entry["params"] += row["params"]
            bits += resident_bits(row, width[(row["expert"], row["layer"])]) * row["params"]
        params = sum(row["params"] for row in rows)
        protected = by_precision.get("high-precision", {"params": 0})["params"]
        some_steps = sum(row["params"] for row in rows if protected_range(row) is not None)
        out[scope] = {
            "layers": len(rows), "params": params, "by_precision": by_precision,
            "protected_share": protected / params if params else 0.0,
            "protected_at_some_steps_share": some_steps / params if params else 0.0,
            "effective_bits": bits / params if params else 0.0,
            "weight_bytes_before": params * HIGH_PRECISION_BITS // 8,
            "weight_bytes_after": int(round(bits / 8)),
        }
    return out


@dataclass
class Plan:
    rules: list[Rule]
    layers: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    schema: str = PLAN_SCHEMA
    sensq_version: str = sensq.__version__

    def protected(self, expert: str) -> list[str]:
        return [row["layer"] for row in self.layers if row["expert"] == expert and row["weight"] is None]

    def to_dict(self) -> dict:
        return {
            "schema": self.schema, "sensq_version": self.sensq_version, "model": self.model, "source": self.source,
            "rules": [r.to_dict() for r in self.rules],
            "layers": self.layers, "summary": self.summary,
        }

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Raises InputError for a missing file, bad JSON, another schema, malformed or unknown-format rules."""
        path = Path(path)
        data = validate_document(read_json(path, PLAN_SCHEMA, "plan"), _PLAN_SPEC, path, "plan")
        rules = []
        for raw in data["rules"]:
            for key in ("weight", "activation"):
                if raw.get(key) is not None:
                    get_format(raw[key])
            if raw["match"].startswith("re:"):
                compile_pattern(raw["match"][3:])
            rules.append(Rule(raw["match"], raw.get("weight"), raw.get("activation"), raw.get("why", ""),
                              raw.get("calibration"), raw.get("steps"), raw.get("sigma")))
        if not rules:
            raise InputError(f"{str(path)!r} has no rules")
        return cls(rules, data.get("layers", []), data.get("summary", {}), data.get("model", {}),
                   data.get("source", {}), data["schema"], data.get("sensq_version", ""))


def with_calibration(plan: Plan, method: str | None) -> Plan:
    """``plan`` with ``calibration: method`` on every rule that quantizes something (rules that keep high
    precision have nothing to calibrate); ``None`` returns it unchanged.

    Raises:
        InputError: an unknown method.
    """
    import dataclasses

    if method is None:
        return plan
    rules = [dataclasses.replace(r, calibration=method) if (r.weight or r.activation) else r for r in plan.rules]
    layers = [{**row, "calibration": method} if (row["weight"] or row["activation"]) else row for row in plan.layers]
    return dataclasses.replace(plan, rules=rules, layers=layers)


def parse_budget(text: str) -> float:
    """``"5%"`` or ``"0.05"`` -> 0.05. A bare number above 1 (``"5"``) is refused: it would mean 500%.

    Raises:
        InputError: not a number, a bare number above 1, or outside 0..100%.
    """
    value = text.strip()
    try:
        share = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise InputError(f"--budget must be a share like 5% or 0.05, got {text!r}") from None
    if not value.endswith("%") and share > 1.0:
        raise InputError(f"--budget {text!r} would mean {share:.0%}; write {value}% or {share / 100:g} for "
                         f"{value} percent")
    if not 0.0 <= share <= 1.0:
        raise InputError(f"--budget must be within 0..100%, got {text!r}")
    return share


def refuse_nan_values(ranking, formats: list[str]) -> None:
    """A plan cannot order layers whose values are NaN (a failed measurement, a damaged ranking).

    Raises:
        InputError: how many layers hold NaN, and the first.
    """
    import math

    for fmt in formats:
        bad = [f"{expert}:{layer.name}" for expert, layers in ranking.experts.items() for layer in layers
               if fmt in layer.value and math.isnan(layer.value[fmt])]
        if bad:
            raise InputError(f"the ranking holds NaN {fmt} values for {len(bad)} layer(s), e.g. {bad[0]}: a plan "
                             "cannot order them; rank again (a NaN usually means a non-finite activation or model)")


def _check_plan_request(ranking, budget, top_k, fmt, act_format, rank_format) -> tuple[str | None, str]:
    """The activation format and the format whose ranking orders the layers; raises InputError on bad options."""
    if (budget is None) == (top_k is None):
        raise InputError("give exactly one of --budget and --top-k")
    if top_k is not None and top_k < 0:
        raise InputError(f"--top-k must be >= 0, got {top_k}")
    get_format(fmt)
    activation = fmt if act_format == "same" else act_format
    if activation is not None:
        get_format(activation)
    if rank_format is None:
        if fmt not in ranking.formats:
            raise InputError(f"the ranking has no {fmt!r} scores (it ranks {', '.join(ranking.formats)}): rank with "
                             f"--format {fmt}, or pass --rank-format to order {fmt} layers by another format's ranking")
        rank_format = fmt  # a plan for format F follows F's own ranking
    if rank_format not in ranking.formats:
        raise InputError(f"the ranking has no {rank_format!r} scores (it has {', '.join(ranking.formats)})")
    return activation, rank_format


def _protected_layers(ordered, expert: str, budget, top_k, protect_entrance: bool, patterns, rank_format: str,
                      metric: str, warnings: list[str]) -> list[tuple[str, str]]:
    """One expert's protected layers with the reason for each: the entrance and --protect patterns, then the
    ranking in order (the top ``top_k``, or each layer that still fits the ``budget`` share)."""
    total = sum(layer.params for layer in ordered)
    chosen: list[tuple[str, str]] = []
    for layer in ordered:
        if protect_entrance and layer.entrance:
            chosen.append((layer.name, "entrance"))
        elif any(p.fullmatch(layer.name) for p in patterns):
            chosen.append((layer.name, "--protect"))
    used = sum(layer.params for layer in ordered if layer.name in dict(chosen))
    if budget is not None and used > budget * total:
        warnings.append(f"{expert}: the entrance and --protect layers alone keep {used / total:.1%} of the "
                        f"parameters in high precision, more than the {budget:.1%} budget")
    picked = 0
    for layer in ordered:
        if layer.name in dict(chosen):
            continue
        if top_k is not None:
            if picked >= top_k:
                break
        elif used + layer.params > budget * total:
            continue
        chosen.append((layer.name, f"rank {layer.rank[rank_format]} by {metric}"))
        used += layer.params
        picked += 1
    return chosen


def _in_steps(ranking, expert: str, fmt: str, steps: tuple[int, int]) -> list:
    """The expert's layers ordered by their per-step values averaged over the denoising steps in ``steps``
    (branches averaged), most sensitive first; [] when none of the expert's steps falls in the range.

    Raises:
        InputError: a ranking without per-step values (e2e rankings score the whole trajectory).
    """
    import numpy as np

    from sensq.metrics import METRICS

    inside = [i for i, step in enumerate(ranking.steps[expert]) if steps[0] <= step <= steps[1]]
    if not inside:
        return []
    layers = ranking.experts[expert]
    if not all(fmt in layer.per_step for layer in layers):
        raise InputError(f"--protect-steps orders layers by their per-step values, which this {ranking.metric} "
                         "ranking does not hold: rank with grad-e2e (the default) or a local metric")
    sign = -1.0 if METRICS[ranking.metric].higher_is_more_sensitive else 1.0

    def score(layer) -> float:
        values = np.asarray(layer.per_step[fmt], dtype=np.float64)[inside].mean(axis=1)
        finite = values[np.isfinite(values)]
        return sign * (float(finite.mean()) if finite.size else np.inf)

    return sorted(layers, key=score)


def entrance_by_default(ranking) -> bool:
    """Whether a budget or top-k plan protects the family's entrance unless told: only for a local ranking.

    Measured (docs/sensitivity.md): local metrics (mse, ...) rank the condition embedders and proj_out near the
    bottom although they do the most end-to-end damage, so their plans need the entrance as a prior; grad-e2e
    and e2e rankings put them first on their own, and forcing ``blocks.0`` on top spends budget on layers the
    data rank low."""
    from sensq.metrics import METRICS

    metric = METRICS.get(ranking.metric)
    return metric is None or metric.local


def build_plan(ranking, *, budget: float | None = None, top_k: int | None = None, protect_entrance: bool | None = None,
               protect: list[str] | None = None, fmt: str = "hif4", act_format: str | None = "same",
               rank_format: str | None = None, protect_steps: tuple[int, int] | None = None) -> Plan:
    """Protect, per expert, the entrance layers (``None``: :func:`entrance_by_default`) and extra patterns, then
    the most sensitive
    layers of the ranking: the top ``top_k``, or while the protected share of the expert's parameters
    stays within ``budget`` (walking the ranking in order and protecting each layer that still fits).
    Everything else gets ``fmt`` for weights and ``act_format`` (default: the same) for activations.

    ``protect_steps=(a, b)``: the protected layers keep high precision at denoising steps a..b only (rules with
    a ``steps`` range; quantized at the other steps), chosen by their sensitivity at those steps (the
    ranking's per-step values); an expert that runs none of those steps protects nothing.

    A block ranking (``sensq rank --metric e2e --granularity block``) is planned block by block: a protected
    block keeps all its layers in high precision (``top_k`` counts blocks).

    Raises:
        InputError: both or neither of ``budget``/``top_k``, a block ranking without its blocks' layers,
            an unknown format, a negative ``top_k``, ``protect_steps`` with a ranking without per-step values.
    """
    activation, rank_format = _check_plan_request(ranking, budget, top_k, fmt, act_format, rank_format)
    refuse_nan_values(ranking, [rank_format])
    if protect_entrance is None:
        protect_entrance = entrance_by_default(ranking)
    patterns = [compile_pattern(p) for p in (protect or [])]
    rules: list[Rule] = []
    infos: list[LayerInfo] = []
    warnings: list[str] = []
    for expert in ranking.experts:
        ordered = ranking.ordered(expert, rank_format)
        if any(layer.members and not layer.member_layers for layer in ordered):
            raise InputError("this block ranking does not record its blocks' layers (made by an older sensq): "
                             "rank again with --granularity block, or rank per layer")
        infos += [LayerInfo(expert, m["name"], m["params"], m["in_features"], m["kind"]) if layer.members else
                  LayerInfo(expert, layer.name, layer.params, layer.in_features, layer.kind)
                  for layer in ordered for m in (layer.member_layers or [None])]
        if protect_steps is not None:
            ordered = _in_steps(ranking, expert, rank_format, protect_steps)
            if not ordered:
                warnings.append(f"{expert}: runs none of steps {protect_steps[0]}-{protect_steps[1]}; nothing "
                                "protected there")
        chosen = _protected_layers(ordered, expert, budget, top_k, protect_entrance, patterns, rank_format,
                                   ranking.metric, warnings)
        if protect_steps is not None:  # say where in the steps' own order each ranked layer stands
            position = {layer.name: i + 1 for i, layer in enumerate(ordered)}
            chosen = [(name, why if not why.startswith("rank ") else
                       f"rank {position[name]} at steps {protect_steps[0]}-{protect_steps[1]} by {ranking.metric}")
                      for name, why in chosen]
        groups = {layer.name: layer.members for layer in ordered if layer.members}
        rules += [Rule(f"{expert}:{member}", None, None, f"{why} (block {name})" if name in groups else why,
                       steps=protect_steps)
                  for name, why in chosen for member in groups.get(name, [name])]
        rules.append(Rule(f"re:{expert}:.*", fmt, activation, "everything else"))
    table, _ = resolve(rules, infos)
    return Plan(
        rules=rules, layers=table, summary=summarize(table, infos),
        model={"id": ranking.provenance.get("model_id"), "fingerprint": ranking.provenance.get("model_fingerprint"),
               "loras": ranking.provenance.get("loras") or {},
               "family": recorded_family(ranking.provenance.get("family")).name},
        source={"ranking_metric": ranking.metric, "ranking_format": rank_format, "reduce": ranking.reduce,
                "budget": budget, "top_k": top_k, "protect_entrance": protect_entrance, "protect": protect or [],
                **({"protect_steps": list(protect_steps)} if protect_steps is not None else {}),
                "probe_sha256": ranking.provenance.get("probe_sha256"), "warnings": warnings,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )


def plan_protecting(chosen: dict[str, list[tuple[str, str]]], layers: list[LayerInfo], fmt: str, *, model: dict,
                    source: dict) -> Plan:
    """A plan that keeps ``chosen`` (per expert, ``(layer, why)``) in high precision and puts every other layer
    of those experts in ``fmt`` (W=A), with its resolved table and summary."""
    rules = [Rule(f"{expert}:{name}", None, None, why) for expert, names in chosen.items() for name, why in names]
    rules += [Rule(f"re:{expert}:.*", fmt, fmt, "everything else") for expert in chosen]
    table, _ = resolve(rules, layers)
    return Plan(rules=rules, layers=table, summary=summarize(table, layers), model=model,
                source={**source, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def model_layers(model) -> list[LayerInfo]:
    """Every quantizable layer of every expert of a loaded model (quantized twins share the originals'
    parameters, so a quantized model lists the same layers)."""
    return layer_infos({e: model.family.expert_module(model.pipe, e) for e in model.family.experts(model.pipe)})


def validate_plan(plan: Plan, layers: list[LayerInfo]) -> list[dict]:
    """Resolve ``plan`` against a model's layers.

    Raises:
        InputError: rules that match no layer (all listed), or a layer no rule decides.
    """
    table, unused = resolve(plan.rules, layers)
    if unused:
        listed = ", ".join(repr(plan.rules[i].match) for i in unused)
        raise InputError(f"{len(unused)} plan rule(s) match no layer of this model: {listed}")
    return table


def plan_family(plan: Plan) -> ModelFamily:
    """The model family a plan was made for (plans from before families name none: Wan2.2-T2V-A14B)."""
    return recorded_family((plan.model or {}).get("family"))


def summary_at_real_size(plan: Plan, family: ModelFamily | None = None) -> dict | None:
    """The same rules resolved on the real model of ``family`` (default: the plan's; its transformer config
    on the meta device; Wan2.2: A14B): the effective bits and weight GB the plan would give there. None when
    the rules leave a layer of the real model undecided."""
    family = family or plan_family(plan)
    experts = sorted({row["expert"] for row in plan.layers}) or list(family.expert_names)
    layers = _real_layers(family.name, tuple(experts))
    try:
        table, _ = resolve(plan.rules, layers)
    except InputError:
        return None
    total = summarize(table, layers)["total"]
    return {"model": family.real_model_id, "effective_bits": total["effective_bits"],
            "weight_gb": total["weight_bytes_after"] / 1e9, "weight_gb_bf16": total["weight_bytes_before"] / 1e9,
            "protected_share": total["protected_share"]}


@functools.lru_cache(maxsize=8)
def _real_layers(family_name: str, experts: tuple[str, ...]) -> list:
    module = get_family(family_name).real_expert_on_meta()
    return layer_infos({expert: module for expert in experts})
