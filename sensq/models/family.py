"""Model families: what sensq needs to know about a diffusers video DiT, declared once per family.

A family (:class:`ModelFamily`) names its pipeline and transformer classes, its experts (pipeline
attributes; one expert is a valid case) and how denoising steps are routed to them, the block list and
the arguments of a block's ``forward`` (read by name from its signature, as diffusers' hooks do), the
entrance and exit layers, how the guidance branches run (one forward per branch inside
``cache_context("cond"|"uncond")``, or both in one batch), and the real model's transformer config (its
layer inventory on the meta device). Every part of sensq (probe, rank, e2e, plan, apply-plan,
calibration, checkpoint, generate, ablate) receives the family of the model it works on and names no
model class itself.

Adding a family is one module that defines a :class:`ModelFamily` (a subclass where the family routes
or checks resolutions its own way) and calls :func:`register_family`; see docs/model-families.md.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sensq.errors import InputError

BRANCH_ORDER = ("cond", "uncond")
"""The order of guidance branches in sensq's files (probe, ranking): the trajectory's ``branches``."""


@dataclass(frozen=True)
class BlockArgument:
    """One argument of a transformer block's ``forward`` that block-by-block calibration replays.

    Attributes:
        parameter: the parameter's name in the block's ``forward`` signature.
        stored: the probe-file dataset name(s) it is kept under: one for a tensor, one per element of a
            tuple of tensors (rotary ``(cos, sin)``).
        model_dtype: cast to the model's dtype on replay (the probe keeps float32).
    """

    parameter: str
    stored: tuple[str, ...]
    model_dtype: bool = False


@dataclass(frozen=True)
class ModelFamily:
    """A diffusers model family (see the module docstring).

    Attributes:
        name: registry key, recorded in checkpoints and plans.
        description: one line for ``--help`` and errors.
        pipeline_class: the diffusers pipeline class name.
        transformer_class: the diffusers class of every expert.
        expert_attrs: expert name -> pipeline attribute, in routing order (the first runs the first steps).
        blocks: the expert's attribute holding the transformer blocks (an ``nn.ModuleList``).
        block_arguments: the block ``forward`` arguments calibration replays.
        entrance: regexes (on layer names inside an expert) of the entrance layers the method protects.
        exit: regexes of the exit layers.
        guidance: ``sequential`` (cond and uncond are separate forwards, each in ``cache_context(branch)``)
            or ``batched`` (one forward, batch halves ``batched_order``, in ``cache_context("cond_uncond")``).
        batched_order: the branches' order along the batch of a batched forward.
        default_resolution: (height, width, frames) when the user passes none.
        tiny_resolution: the default for saved tiny test pipelines (hidden size < 1024).
        real_model_id: the real model whose transformer config is ``real_config``.
        real_config: that config (``transformer/config.json``): the layer inventory at real size.
        schedulers: the trajectory schedulers the pipeline accepts.
        frame_multiple: frames must be ``frame_multiple * k + 1``.
        size_multiple: height and width must be multiples of it.
    """

    name: str
    description: str
    pipeline_class: str
    transformer_class: str
    expert_attrs: dict[str, str]
    blocks: str
    block_arguments: tuple[BlockArgument, ...]
    entrance: tuple[str, ...]
    exit: tuple[str, ...]
    guidance: str = "sequential"
    batched_order: tuple[str, ...] = ("uncond", "cond")
    default_resolution: tuple[int, int, int] = (480, 832, 81)
    tiny_resolution: tuple[int, int, int] = (32, 32, 9)
    real_model_id: str = ""
    real_config: dict = field(default_factory=dict)
    schedulers: tuple[str, ...] = ("unipc", "euler")
    frame_multiple: int = 4
    size_multiple: int = 16

    # --- experts and routing -------------------------------------------------------------------------

    @property
    def expert_names(self) -> tuple[str, ...]:
        return tuple(self.expert_attrs)

    def expert_label(self, expert: str) -> str:
        """How reports name an expert (``the main expert``; Wan2.2: ``high-noise expert``)."""
        return f"{expert} expert"

    def experts(self, pipe) -> list[str]:
        """Expert names present in ``pipe``, in routing order."""
        return [name for name, attr in self.expert_attrs.items() if getattr(pipe, attr, None) is not None]

    def expert_module(self, pipe, expert: str) -> torch.nn.Module:
        """The expert's transformer.

        Raises:
            InputError: an expert this family does not have, or one missing from ``pipe``.
        """
        if expert not in self.expert_attrs:
            raise InputError(f"unknown expert {expert!r}; {self.name} has: {', '.join(self.expert_attrs)}")
        module = getattr(pipe, self.expert_attrs[expert], None)
        if module is None:
            raise InputError(f"this pipeline has no {self.expert_attrs[expert]!r} ({expert} expert)")
        return module

    def boundary_timestep(self, pipe) -> float | None:
        """The timestep where routing changes expert; None for one expert."""
        return None

    def route(self, pipe, timestep: float) -> str:
        """The expert that runs ``timestep`` (one expert: always it)."""
        return self.experts(pipe)[0]

    def forward_argument(self, expert_module: torch.nn.Module, args: tuple, kwargs: dict, name: str):
        """Argument ``name`` (``timestep``, ``hidden_states``) of a call of an expert's ``forward``, bound to
        its signature (positional or keyword alike); None when the call does not pass it."""
        forward = type(expert_module).forward  # the class's: hooks replace the instance's forward
        return inspect.signature(forward).bind_partial(expert_module, *args, **kwargs).arguments.get(name)

    def call_kwargs(self, pipe, trajectory) -> dict:
        """Extra pipeline ``__call__`` arguments a trajectory needs in this family."""
        return {}

    def schedule(self, pipe, trajectory) -> dict:
        """The ``scheduler.set_timesteps`` arguments the pipeline uses for ``trajectory`` (to know the
        steps before running them)."""
        return {"num_inference_steps": trajectory.steps}

    def video_latents(self, pipe, latents: torch.Tensor, trajectory) -> torch.Tensor:
        """The pipeline's ``latent`` output as ``[B, C, F, H, W]`` (the identity where it already is)."""
        return latents

    # --- layers and blocks ---------------------------------------------------------------------------

    @property
    def first_block(self) -> str:
        return f"{self.blocks}.0"

    def block_of(self, layer: str) -> str | None:
        """``blocks.N`` holding ``layer`` (a name inside an expert), or None outside the blocks."""
        parts = layer.split(".")
        prefix = self.blocks.split(".")
        if parts[: len(prefix)] == prefix and len(parts) > len(prefix) + 1 and parts[len(prefix)].isdigit():
            return ".".join(parts[: len(prefix) + 1])
        return None

    def block_list(self, expert_module: torch.nn.Module) -> torch.nn.ModuleList:
        return expert_module.get_submodule(self.blocks)

    def fixed_recipe(self, n_blocks: int) -> tuple[str, str] | None:
        """A published fixed high-precision set for this family, ``(name, regex on layer names)``, that the
        ablation compares sensq's plans with; None where there is none."""
        return None

    def entrance_rule(self, experts: list[str]) -> str:
        """The plan rule's ``match`` for the entrance layers of ``experts``: ``re:(high|low):(patch_embedding|...)``."""
        who = experts[0] if len(experts) == 1 else f"({'|'.join(experts)})"
        return f"re:{who}:({'|'.join(self.entrance)})"

    def is_entrance(self, layer: str) -> bool:
        return any(re.fullmatch(pattern, layer) for pattern in self.entrance)

    def is_exit(self, layer: str) -> bool:
        return any(re.fullmatch(pattern, layer) for pattern in self.exit)

    def block_inputs(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """The replayed arguments of one block call, by stored name (bound to the ``forward`` signature, so
        positional and keyword calls read the same)."""
        bound = inspect.signature(block.forward).bind_partial(*args, **kwargs).arguments
        values = {}
        for argument in self.block_arguments:
            value = bound.get(argument.parameter)
            if value is None:
                continue
            parts = value if isinstance(value, (tuple, list)) else (value,)
            if len(parts) != len(argument.stored):
                raise ValueError(f"{self.name}: block argument {argument.parameter!r} has {len(parts)} tensors, "
                                 f"expected {len(argument.stored)}")
            values.update(zip(argument.stored, parts, strict=True))
        return values

    def block_call(self, stored: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> dict:
        """The keyword arguments of a block call from its stored inputs (see :meth:`block_inputs`)."""
        kwargs = {}
        for argument in self.block_arguments:
            if not all(name in stored for name in argument.stored):
                continue
            parts = [stored[name].to(device=device, **({"dtype": dtype} if argument.model_dtype else {}))
                     for name in argument.stored]
            kwargs[argument.parameter] = parts[0] if len(parts) == 1 else tuple(parts)
        return kwargs

    @staticmethod
    def block_output(output) -> torch.Tensor:
        """The hidden states a block returns (some families return a tuple with them first)."""
        return output[0] if isinstance(output, tuple) else output

    # --- guidance branches ---------------------------------------------------------------------------

    def forward_branches(self, context_name: str | None, branches: tuple[str, ...], batch: int) -> tuple[str, ...]:
        """The branches one expert forward carries, in batch order.

        Raises:
            RuntimeError: the forward ran outside the pipeline's cache context, or under an unexpected one.
        """
        if context_name is None:
            raise RuntimeError(f"probe hooks ran outside the pipeline's cache_context; run the expert through "
                               f"its {self.pipeline_class}")
        if self.guidance == "sequential":
            if context_name not in branches:
                raise RuntimeError(f"unexpected cache context {context_name!r} (branches {branches})")
            return (context_name,)
        order = tuple(b for b in self.batched_order if b in branches)
        if batch != len(order):
            raise RuntimeError(f"a batched forward of {batch} for branches {order}")
        return order

    # --- loading -------------------------------------------------------------------------------------

    def transformer_type(self) -> type:
        import diffusers

        return getattr(diffusers, self.transformer_class)

    def pipeline_type(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def matches(self, pipe) -> bool:
        """``pipe`` is this family's pipeline with exactly this family's experts present."""
        present = {attr for attr in set().union(*(f.expert_attrs.values() for f in FAMILIES.values()))
                   if getattr(pipe, attr, None) is not None}
        return type(pipe).__name__ == self.pipeline_class and present == set(self.expert_attrs.values())

    def real_expert_on_meta(self, **overrides) -> torch.nn.Module:
        """One expert of the real model (``real_config``, with ``overrides``) on the meta device."""
        with torch.device("meta"):
            return self.transformer_type()(**{**self.real_config, **overrides})

    def check_resolution(self, pipe, height: int, width: int, frames: int, dtype: torch.dtype,
                         device: torch.device) -> int | None:
        """Refuse a resolution this family cannot run (before allocating anything); returns the estimated
        peak bytes where the family knows it.

        Raises:
            InputError: height, width or frames off the family's grid.
        """
        for label, value in (("height", height), ("width", width)):
            if value % self.size_multiple:
                raise InputError(f"--{label} must be a multiple of {self.size_multiple} for {self.name}, got {value}")
        if (frames - 1) % self.frame_multiple:
            raise InputError(f"--frames must be {self.frame_multiple}k+1 for {self.name}, got {frames}")
        return None

    def check_trajectory(self, trajectory) -> None:
        """Raises InputError for a trajectory this family's pipeline cannot run."""
        if trajectory.scheduler not in self.schedulers:
            raise InputError(f"{self.name} runs --scheduler {' or '.join(self.schedulers)}, not "
                             f"{trajectory.scheduler!r}")


@dataclass(frozen=True)
class TinyModel:
    """An embedded model: built in-process from config objects (random weights, seeds fixed)."""

    build: Callable[[], object]
    resolution: tuple[int, int, int]


FAMILIES: dict[str, ModelFamily] = {}
"""Registered families by name; ``sensq.models`` imports the built-in family modules, which register."""


def register_family(family: ModelFamily) -> ModelFamily:
    """Make ``family`` known to every part of sensq; returns it."""
    if family.guidance not in ("sequential", "batched"):
        raise ValueError(f"{family.name}: guidance must be 'sequential' or 'batched', got {family.guidance!r}")
    FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Remove a family added by :func:`register_family` (tests)."""
    FAMILIES.pop(name, None)


def get_family(name: str) -> ModelFamily:
    """The registered family ``name``.

    Raises:
        InputError: unknown name (the message lists the known ones).
    """
    try:
        return FAMILIES[name]
    except KeyError:
        raise InputError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


LEGACY_FAMILY = "wan2.2-t2v-a14b"
"""The family of files written before sensq recorded one (rankings, plans, checkpoints): Wan2.2-T2V-A14B."""


def recorded_family(name: str | None) -> ModelFamily:
    """The family a file records (``None`` or missing: :data:`LEGACY_FAMILY`)."""
    return get_family(name or LEGACY_FAMILY)


def family_of(pipe) -> ModelFamily:
    """The registered family of a loaded pipeline (its class and the experts it holds).

    Raises:
        InputError: no registered family matches (the message names the pipeline and the families).
    """
    for family in FAMILIES.values():
        if family.matches(pipe):
            return family
    raise InputError(f"sensq has no model family for a {type(pipe).__name__}; supported: "
                     + "; ".join(f"{f.name} ({f.description})" for f in FAMILIES.values()))
