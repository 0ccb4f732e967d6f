"""Layers whose precision follows the denoising step: a plan rule with a ``steps`` or ``sigma`` range.

A :class:`StepClock` follows the pipeline: a forward pre-hook on every expert reads the ``timestep``
argument of the call (bound to the expert's ``forward`` signature by the model family; nothing counts
calls) and finds its step in the scheduler's ``timesteps`` and its noise level ``sigma = timestep /
num_train_timesteps``. A :class:`PhasedLayer` holds the layer's variants (its base form, the one the
first range-less rule gives, and one per range rule) and runs, at every call, the first variant whose
range holds the clock's step, else the base. Variants share the original parameters; a variant in the
base's formats is the base itself. A phased layer called outside a pipeline run (no timestep seen yet)
is an error, not a guess.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook

from sensq.models.layers import layer_kind
from sensq.plan.layer_config import LayerConfig, StepRange
from sensq.quant.layers import original_module, quantize_module
from sensq.trajectory import step_index

STEP_CLOCK_ATTR = "_sensq_step_clock"
"""The pipeline attribute holding its :class:`StepClock` (one per pipeline, attached once)."""


CLOCK_HOOK = "sensq_step_clock"


class _ClockHook(ModelHook):
    """diffusers' hook (the mechanism every sensq hook uses) that shows each expert forward to the clock."""

    def __init__(self, clock: StepClock):
        super().__init__()
        self.clock = clock

    def pre_forward(self, module, *args, **kwargs):
        self.clock._see(module, args, kwargs)
        return args, kwargs


class StepClock:
    """The step the pipeline is running, kept up to date by a hook on each of its experts."""

    def __init__(self, pipe, family):
        self.pipe, self.family = pipe, family
        self.timestep: float | None = None
        self._step: int | None = None
        self.registries: list = []

    def attach(self) -> StepClock:
        for expert in self.family.experts(self.pipe):
            registry = HookRegistry.check_if_exists_or_initialize(self.family.expert_module(self.pipe, expert))
            registry.register_hook(_ClockHook(self), CLOCK_HOOK)
            self.registries.append(registry)
        return self

    def detach(self) -> None:
        for registry in self.registries:
            registry.remove_hook(CLOCK_HOOK, recurse=False)
        self.registries.clear()

    def _see(self, module, args, kwargs):
        """Once per expert forward (not per layer call): the timestep, and its index in the scheduler's
        ``timesteps`` (set by the pipeline before its first forward)."""
        timestep = self.family.forward_argument(module, args, kwargs, "timestep")
        if timestep is not None:
            self.timestep = float(torch.as_tensor(timestep).flatten()[0])
            self._step = step_index(self.pipe, self.timestep)

    def _now(self) -> float:
        if self.timestep is None:
            raise RuntimeError("a layer whose precision follows the denoising step ran outside a pipeline call "
                               "(no expert forward with a timestep has been seen)")
        return self.timestep

    @property
    def step(self) -> int:
        """0-based index of the current timestep in the scheduler's ``timesteps``."""
        self._now()
        return self._step

    @property
    def sigma(self) -> float:
        return self._now() / float(self.pipe.scheduler.config.get("num_train_timesteps", 1000))


def dead_ranges(pipe, family, timesteps: list[float]) -> list[str]:
    """One line per distinct step or sigma range of the deployed phased layers that no step of ``timesteps``
    (the trajectory about to run) falls in: such a rule never decides its layers, the next rule does."""
    num_train = float(pipe.scheduler.config.get("num_train_timesteps", 1000))
    dead: dict[tuple, list[str]] = {}
    for expert in family.experts(pipe):
        for name, module in family.expert_module(pipe, expert).named_modules():
            if not isinstance(module, PhasedLayer):
                continue
            for phase in module.step_ranges:
                if not any(phase.covers(i, t / num_train) for i, t in enumerate(timesteps)):
                    dead.setdefault((phase.key, *phase.bounds), []).append(f"{expert}:{name}")
    return [f"the rule for {key} {low}-{high} ({len(layers)} layers, e.g. {layers[0]}) never applies: this "
            f"{len(timesteps)}-step trajectory has no step there, so the next matching rule decides at every step"
            for (key, low, high), layers in dead.items()]


class PhasedLayer(torch.nn.Module):
    """One quantizable layer with a variant per step range (see the module docstring)."""

    def __init__(self, base: torch.nn.Module, variants: list[torch.nn.Module], step_ranges: tuple[StepRange, ...],
                 clock: StepClock):
        super().__init__()
        self.base = base
        self.variants = torch.nn.ModuleList(variants)
        # the ranges without the rule indices (a layer needs only what it runs)
        self.step_ranges = tuple(StepRange(p.weight, p.activation, p.steps, p.sigma) for p in step_ranges)
        self.clock = clock
        self.sensq_layer_kind = layer_kind(base)  # the layer it stands for (sensq.models.layers)

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The GEMM weight's ``[out, in]`` (what layer inventories count)."""
        if hasattr(self.base, "weight_shape"):
            return tuple(self.base.weight_shape)
        return self.base.weight.shape[0], self.base.weight[0].numel()

    @property
    def bias(self):
        return self.base.bias

    def current(self) -> torch.nn.Module:
        for phase, variant in zip(self.step_ranges, self.variants, strict=True):
            if phase.covers(self.clock.step, self.clock.sigma):
                return variant
        return self.base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.current()(x)

    def extra_repr(self) -> str:
        return "step ranges: " + "; ".join(f"{p.describe()}: {p.weight}/{p.activation}" for p in self.step_ranges)


def is_phased(module: torch.nn.Module) -> bool:
    return isinstance(module, PhasedLayer)


def step_clock(pipe, family) -> StepClock:
    """The pipeline's step clock, attached on first use (one per pipeline)."""
    clock = getattr(pipe, STEP_CLOCK_ATTR, None)
    if clock is None:
        clock = StepClock(pipe, family).attach()
        setattr(pipe, STEP_CLOCK_ATTR, clock)
    return clock


def remove_step_clock(pipe) -> None:
    clock = getattr(pipe, STEP_CLOCK_ATTR, None)
    if clock is not None:
        clock.detach()
        delattr(pipe, STEP_CLOCK_ATTR)


def phased_layer(base: torch.nn.Module, row: LayerConfig, clock: StepClock | None, backend: str = "auto",
                 plain: torch.nn.Module | None = None) -> PhasedLayer:
    """``base`` (the layer as the row's range-less rule left it) with a variant per ``row.step_ranges``: the base
    itself when a range's formats are the base's, the original layer for high precision, else a twin in
    its formats (the format's own rule). ``plain``: the full-precision layer when ``base`` does not hold it
    (a deployed, packed base)."""
    plain = plain if plain is not None else original_module(base)
    variants = []
    for phase in row.step_ranges:
        if (phase.weight, phase.activation) == (row.weight, row.activation):
            variants.append(base)
        elif phase.weight is None and phase.activation is None:
            variants.append(plain)
        else:
            variants.append(quantize_module(plain, phase.weight, phase.activation, backend))
    return PhasedLayer(base, variants, row.step_ranges, clock)
