"""The plan itself: rules, their resolution against a model's layers, the summary, the file."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import sensq
from sensq.errors import InputError
from sensq.formats import get_format
from sensq.models import ModelFamily, get_family
from sensq.models.family import recorded_family
from sensq.models.layers import LayerInfo, layer_infos
from sensq.plan.calibrations import METHODS
from sensq.plan.layer_config import LayerConfig, StepRange
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

    def step_range(self, index: int | None = None) -> StepRange | None:
        """The rule's formats in its range (``index``: its place in the plan), or None for a rule without one."""
        if self.steps is None and self.sigma is None:
            return None
        return StepRange(self.weight, self.activation, self.steps, self.sigma, index)

    @classmethod
    def from_dict(cls, raw: dict) -> Rule:
        """A rule as a plan file holds it (``match``, formats, optional ``why``, ``calibration``, ``steps`` or
        ``sigma``), its formats and pattern checked.

        Raises:
            InputError: an unknown format, a bad pattern, a bad calibration or range.
        """
        for key in ("weight", "activation"):
            if raw.get(key) is not None:
                get_format(raw[key])
        if raw["match"].startswith("re:"):
            compile_pattern(raw["match"][3:])
        return cls(raw["match"], raw.get("weight"), raw.get("activation"), raw.get("why", ""), raw.get("calibration"),
                   raw.get("steps"), raw.get("sigma"))

    def to_dict(self) -> dict:
        return {"match": self.match, "weight": self.weight, "activation": self.activation,
                **({"why": self.why} if self.why else {}),
                **({"calibration": self.calibration} if self.calibration else {}), **(self.phase or {})}

    def matches(self, expert: str, layer: str) -> bool:
        qualified = f"{expert}:{layer}"
        if self.match.startswith("re:"):
            return compile_pattern(self.match[3:]).fullmatch(qualified) is not None
        return self.match == qualified


def resolve(rules: list[Rule], layers: list[LayerInfo]) -> tuple[list[LayerConfig], list[int]]:
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
            step_range = rule.step_range(index)
            if step_range is not None:  # decides only inside its range; later rules decide the other steps
                phases.append(step_range)
                continue
            table.append(LayerConfig(layer.expert, layer.name, rule.weight, rule.activation, layer.params,
                                     layer.kind, index, rule.calibration, tuple(phases)))
            break
        else:
            raise InputError(f"no rule of the plan matches {layer.expert}:{layer.name}"
                             f"{' outside its step ranges' if phases else ''}; add a catch-all rule "
                             f"such as 're:{layer.expert}:.*'")
    return table, [i for i, hit in enumerate(used) if not hit]


def resident_bits(row: LayerConfig, in_features: int) -> float:
    """Bits per weight a resolved row keeps resident: its format's, or, for a layer whose precision changes
    with the step (``phases``), the sum over the distinct weights it holds (each phase's format and the
    base's; high precision counts 16): both are deployed, neither is re-derived from the other."""
    formats = {row.weight} | {phase.weight for phase in row.step_ranges}
    return sum(HIGH_PRECISION_BITS if f is None else get_format(f).bits_per_element(in_features) for f in formats)


def summarize(table: list[LayerConfig], layers: list[LayerInfo]) -> dict:
    """Layers and parameters per precision, effective bits per parameter, weight bytes before/after."""
    width = {(layer.expert, layer.name): layer.in_features for layer in layers}
    out: dict[str, dict] = {}
    for scope in sorted({row.expert for row in table}) + ["total"]:
        rows = [row for row in table if scope in ("total", row.expert)]
        by_precision: dict[str, dict[str, int]] = {}
        bits = 0.0
        for row in rows:
            key = row.weight or "high-precision"
            entry = by_precision.setdefault(key, {"layers": 0, "params": 0})
            entry["layers"] += 1
            entry["params"] += row.params
            bits += resident_bits(row, width[(row.expert, row.layer)]) * row.params
        params = sum(row.params for row in rows)
        protected = by_precision.get("high-precision", {"params": 0})["params"]
        some_steps = sum(row.params for row in rows if row.protected_range() is not None)
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
    layers: list[LayerConfig] = field(default_factory=list)
    """The resolved table: one config per layer of the model the plan was made on."""
    summary: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    schema: str = PLAN_SCHEMA
    sensq_version: str = sensq.__version__

    def protected(self, expert: str) -> list[str]:
        return [row.layer for row in self.layers if row.expert == expert and row.weight is None]

    def to_dict(self) -> dict:
        return {
            "schema": self.schema, "sensq_version": self.sensq_version, "model": self.model, "source": self.source,
            "rules": [r.to_dict() for r in self.rules],
            "layers": [row.to_dict() for row in self.layers], "summary": self.summary,
        }

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Raises InputError for a missing file, bad JSON, another schema, malformed or unknown-format rules."""
        path = Path(path)
        data = validate_document(read_json(path, PLAN_SCHEMA, "plan"), _PLAN_SPEC, path, "plan")
        rules = [Rule.from_dict(raw) for raw in data["rules"]]
        if not rules:
            raise InputError(f"{str(path)!r} has no rules")
        try:
            layers = [LayerConfig.from_dict(row) for row in data.get("layers", [])]
        except (ValueError, TypeError, KeyError) as error:
            raise InputError(f"{str(path)!r}: a row of its resolved 'layers' table is malformed ({error}); "
                             "write the plan again with `sensq plan`") from None
        return cls(rules, layers, data.get("summary", {}), data.get("model", {}),
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
    layers = [dataclasses.replace(row, calibration=method) if row.quantized else row for row in plan.layers]
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


def model_layers(model) -> list[LayerInfo]:
    """Every quantizable layer of every expert of a loaded model (quantized twins share the originals'
    parameters, so a quantized model lists the same layers)."""
    return layer_infos({e: model.family.expert_module(model.pipe, e) for e in model.family.experts(model.pipe)})


def validate_plan(plan: Plan, layers: list[LayerInfo]) -> list[LayerConfig]:
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
    experts = sorted({row.expert for row in plan.layers}) or list(family.expert_names)
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
