"""The typed configuration of one layer, as a plan resolves it: what every part of sensq that acts on a layer
reads (quantization, calibration, checkpoints, exports, reports), in the spirit of torchao's per-module
``AOBaseConfig``.

A :class:`LayerConfig` is one row of a plan's resolved table (``plan.layers``): the layer, its weight and
activation formats (``None``: high precision), its calibration method, and the :class:`StepRange` s in which
other formats apply (rules with ``steps`` or ``sigma``). In plan files the table is a list of JSON objects
with the same names (``to_dict``/``from_dict`` convert; a file's extra keys are kept as they were).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepRange:
    """The formats a layer takes at some denoising steps only: the step indices ``steps`` (0-based, both ends
    included, counted over the whole trajectory) or the noise levels ``sigma`` (both ends included); ``rule``:
    the index of the plan rule it comes from."""

    weight: str | None
    activation: str | None
    steps: tuple[int, int] | None = None
    sigma: tuple[float, float] | None = None
    rule: int | None = None

    def __post_init__(self):
        if (self.steps is None) == (self.sigma is None):
            raise ValueError("a step range needs one of 'steps' or 'sigma'")

    @property
    def key(self) -> str:
        """``"steps"`` or ``"sigma"``: which kind of range it is."""
        return "steps" if self.steps is not None else "sigma"

    @property
    def bounds(self) -> tuple[float, float]:
        return self.steps if self.steps is not None else self.sigma

    def covers(self, step: int, sigma: float) -> bool:
        """Whether the step ``step`` of noise level ``sigma`` falls in the range (both ends included)."""
        low, high = self.bounds
        return low <= (step if self.steps is not None else sigma) <= high

    def describe(self) -> str:
        """``steps 0-1`` or ``sigma 0-0.25``."""
        return f"{self.key} {self.bounds[0]:g}-{self.bounds[1]:g}"

    def to_dict(self) -> dict:
        return {self.key: list(self.bounds), "weight": self.weight, "activation": self.activation,
                **({"rule": self.rule} if self.rule is not None else {})}

    @classmethod
    def from_dict(cls, data: Mapping) -> StepRange:
        """Raises ValueError, TypeError or KeyError for a malformed range (callers name the file)."""
        steps, sigma = data.get("steps"), data.get("sigma")
        return cls(data.get("weight"), data.get("activation"), tuple(steps) if steps is not None else None,
                   tuple(sigma) if sigma is not None else None, data.get("rule"))


@dataclass(frozen=True)
class LayerConfig:
    """How one layer of one expert is deployed, as its plan decided it."""

    expert: str
    layer: str
    weight: str | None
    """The weight's format name (:func:`sensq.formats.get_format`); None keeps the model's precision."""
    activation: str | None
    """The input activation's format name; None leaves activations as they are."""
    params: int = 0
    kind: str | None = None
    """``linear`` or ``patch_conv`` (:mod:`sensq.models.layers`); None in plans older than layer kinds."""
    rule: int | None = None
    """The index of the plan rule that decided the layer outside its step ranges."""
    calibration: str | None = None
    """The rule's calibration method; None: the one apply-plan is given (``--calibrate``)."""
    step_ranges: tuple[StepRange, ...] = ()
    """The step ranges in which earlier rules give the layer other formats, first match first (``phases`` in
    plan files and checkpoint manifests)."""
    extra: Mapping = field(default_factory=dict, compare=False, repr=False)
    """Keys of a plan file's row that sensq does not read, written back as they were."""

    @property
    def name(self) -> str:
        """``expert:layer``, as plan rules and messages name a layer."""
        return f"{self.expert}:{self.layer}"

    @property
    def quantized(self) -> bool:
        """Whether the layer's weight or activation is quantized outside its step ranges."""
        return self.weight is not None or self.activation is not None

    def protected_range(self) -> str | None:
        """For a layer quantized except at some steps, where a range keeps it in high precision: that range as
        text (``steps 0-1``; the first such range's); else None."""
        if self.weight is None:
            return None
        return next((phase.describe() for phase in self.step_ranges if phase.weight is None), None)

    def to_dict(self) -> dict:
        return {**self.extra, "expert": self.expert, "layer": self.layer, "weight": self.weight,
                "activation": self.activation, "params": self.params,
                **({"kind": self.kind} if self.kind is not None else {}),
                **({"rule": self.rule} if self.rule is not None else {}),
                **({"calibration": self.calibration} if self.calibration else {}),
                **({"phases": [phase.to_dict() for phase in self.step_ranges]} if self.step_ranges else {})}

    @classmethod
    def from_dict(cls, data: Mapping) -> LayerConfig:
        """Raises ValueError, TypeError or KeyError for a malformed row (callers name the file)."""
        known = ("expert", "layer", "weight", "activation", "params", "kind", "rule", "calibration", "phases")
        for key in ("expert", "layer"):
            if not isinstance(data[key], str):
                raise TypeError(f"{key!r} must be a string")
        for key in ("weight", "activation", "kind", "calibration"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise TypeError(f"{key!r} must be a string or null")
        params = data.get("params", 0)
        if not isinstance(params, int) or isinstance(params, bool):
            raise TypeError("'params' must be an integer")
        phases = data.get("phases") or ()
        if not isinstance(phases, (list, tuple)) or not all(isinstance(p, Mapping) for p in phases):
            raise TypeError("'phases' must be a list of objects")
        return cls(data["expert"], data["layer"], data.get("weight"), data.get("activation"), params,
                   data.get("kind"), data.get("rule"), data.get("calibration"),
                   tuple(StepRange.from_dict(p) for p in phases),
                   {k: v for k, v in data.items() if k not in known})
