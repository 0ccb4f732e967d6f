"""Capture hooks: what every quantizable layer of an expert sees, per step and guidance branch.

Hooks are diffusers ``ModelHook``s registered under one name (:data:`HOOK_NAME`) and removed by
:func:`remove_probe`. The guidance branch comes from the pipeline's own ``cache_context`` ("cond" |
"uncond" for a family that runs one forward per branch; "cond_uncond" for one that batches them, whose
batch is then split in the family's branch order), caught by a stateful hook on the expert (diffusers
hands the context to every ``StateManager`` of a stateful hook); the timestep comes from the expert's
``timestep`` argument and the step from the pipeline's step-end callback. Nothing counts calls. The
first block's inputs are read by name from its ``forward`` signature (the family's ``block_arguments``).

Statistics stay on the model's device during a step; :meth:`ProbeSession.take_step` moves them to
the host once per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

from sensq.models.family import ModelFamily
from sensq.models.layers import input_rows, layer_kind, layer_size, output_rows, quantizable_layers
from sensq.store.probe_writer import LayerShape

HOOK_NAME = "sensq_probe"
CONTEXT_HOOK_NAME = "sensq_probe_context"


@dataclass(frozen=True)
class ProbeConfig:
    """What to capture.

    Attributes:
        tokens: token rows sampled (deterministically) from every layer's input per step and branch.
        first_block_inputs: also keep the full inputs of the first block (what block-by-block
            calibration replays from).
        sample_seed: seed of the token subsample (the same rows at every step and prompt).
        outputs: also keep every layer's output at the sampled rows: ``rank`` then takes them as the
            full-precision reference instead of recomputing the GEMM (what the model really computed, in
            its own dtype; about as many bytes again as the samples).
    """

    tokens: int = 32
    first_block_inputs: bool = True
    sample_seed: int = 0
    outputs: bool = False


class ContextCatcher(StateManager):
    """Receives the pipeline's CacheContext (diffusers calls ``set_context`` on stateful hooks)."""

    def __init__(self, session: ProbeSession):
        super().__init__(dict)
        self.session = session

    def set_context(self, context) -> None:
        super().set_context(context)
        self.session.context = context


class _ExpertHook(ModelHook):
    _is_stateful = True

    def __init__(self, session: ProbeSession, expert: str):
        super().__init__()
        self.session = session
        self.expert = expert
        self.catcher = ContextCatcher(session)

    def pre_forward(self, module, *args, **kwargs):
        family = self.session.family
        timestep = family.forward_argument(module, args, kwargs, "timestep")
        hidden = family.forward_argument(module, args, kwargs, "hidden_states")
        self.session.begin_forward(self.expert, float(timestep.flatten()[0]), hidden.shape[0])
        return args, kwargs

    def reset_state(self, module):
        self.catcher.reset()
        return module


class _LayerHook(ModelHook):
    def __init__(self, session: ProbeSession, expert: str, name: str):
        super().__init__()
        self.session = session
        self.expert = expert
        self.name = name

    def pre_forward(self, module, *args, **kwargs):
        for branch, x in self.session.split(args[0].detach()):
            self.session.record_layer(self.expert, self.name, module, branch, input_rows(module, x))
        return args, kwargs

    def post_forward(self, module, output):
        if self.session.config.outputs:
            for branch, out in self.session.split(output.detach()):
                self.session.record_output(self.name, branch, output_rows(out))
        return output


class _FirstBlockHook(ModelHook):
    def __init__(self, session: ProbeSession, expert: str):
        super().__init__()
        self.session = session
        self.expert = expert

    def pre_forward(self, module, *args, **kwargs):
        values = self.session.family.block_inputs(module, args, kwargs)
        self.session.record_first_block({k: v.detach() for k, v in values.items()})
        return args, kwargs


STATS = ("channel_absmax", "token_absmax", "samples")
OUTPUTS = "outputs"


@dataclass
class StepData:
    """One step of one expert, on the host.

    ``packed[stat]`` is ``[branch, size]``: the statistic of every layer, flattened and
    concatenated in ``order`` (the layers' execution order, fixed at the expert's first step).
    """

    expert: str
    step: int
    timestep: float
    order: list[str]
    packed: dict[str, np.ndarray]
    first_block: dict[str, np.ndarray]


@dataclass
class ProbeSession:
    """State shared by the hooks of one probe run."""

    config: ProbeConfig
    branches: tuple[str, ...]
    family: ModelFamily
    context: object = None
    expert: str | None = None
    timestep: float | None = None
    forward_branches: tuple[int, ...] = ()
    """Indices (into ``branches``) of the branches the current forward carries, in batch order."""
    sample_rows: dict[int, torch.Tensor] = field(default_factory=dict)
    orders: dict[str, list[str]] = field(default_factory=dict)
    layer_meta: dict[tuple[str, str], LayerShape] = field(default_factory=dict)
    _layers: dict = field(default_factory=dict)
    _first: dict = field(default_factory=dict)

    def begin_forward(self, expert: str, timestep: float, batch: int) -> None:
        name = None if self.context is None else self.context.name
        carried = self.family.forward_branches(name, self.branches, batch)
        self.expert, self.timestep = expert, timestep
        self.forward_branches = tuple(self.branches.index(b) for b in carried)

    def split(self, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """``x`` (batch first) as ``(branch index, its part)`` for every branch the forward carries."""
        if len(self.forward_branches) == 1:
            return [(self.forward_branches[0], x)]
        return list(zip(self.forward_branches, x.chunk(len(self.forward_branches)), strict=True))

    def rows_for(self, tokens: int, device: torch.device) -> torch.Tensor:
        """The sampled row indices for a layer with ``tokens`` input rows (sorted, deterministic)."""
        if tokens not in self.sample_rows:
            generator = torch.Generator().manual_seed(self.config.sample_seed)
            rows = torch.randperm(tokens, generator=generator)[: self.config.tokens].sort().values
            self.sample_rows[tokens] = rows
        return self.sample_rows[tokens].to(device)

    def record_layer(self, expert: str, name: str, module: torch.nn.Module, branch: int, rows: torch.Tensor) -> None:
        magnitude = rows.abs()  # once, reused by both statistics
        stats = {
            "channel_absmax": magnitude.amax(0).float(),
            "token_absmax": magnitude.amax(1).float(),
            "samples": rows.index_select(0, self.rows_for(rows.shape[0], rows.device)).float(),
        }
        self._layers.setdefault(name, {}).setdefault(branch, stats)
        if (expert, name) not in self.layer_meta:
            kind = layer_kind(module)
            params, _ = layer_size(module)
            out_features = module.weight_shape[0] if hasattr(module, "weight_shape") else (
                module.out_channels if kind == "conv3d" else module.out_features)
            self.layer_meta[(expert, name)] = LayerShape(kind, rows.shape[1], out_features, params, rows.shape[0],
                                                         self.sample_rows[rows.shape[0]].numpy())

    def record_output(self, name: str, branch: int, rows: torch.Tensor) -> None:
        stats = self._layers[name][branch]
        if OUTPUTS not in stats:  # the first call of the branch, as for the inputs
            stats[OUTPUTS] = rows.index_select(0, self.rows_for(rows.shape[0], rows.device)).float()

    def record_first_block(self, values: dict[str, torch.Tensor]) -> None:
        """One block call's inputs, one batch element per branch (an input broadcast over the batch, such
        as Wan's rotary table, is kept once per branch too)."""
        n = len(self.forward_branches)
        for position, branch in enumerate(self.forward_branches):
            self._first[branch] = {k: (v[position] if v.shape[0] == n else v[0]).float() for k, v in values.items()}

    def take_step(self, step: int) -> StepData:
        """Pack the step just finished (all layers, all branches) and move it to the host at once."""
        n = len(self.branches)
        order = self.orders.setdefault(self.expert, list(self._layers))
        if set(self._layers) != set(order) or any(len(per_branch) != n for per_branch in self._layers.values()):
            raise RuntimeError(f"step {step}: the layers that ran differ from the first step's, or a branch of "
                               f"{self.branches} is missing")
        packed = {
            stat: torch.stack([torch.cat([self._layers[name][b][stat].reshape(-1) for name in order])
                               for b in range(n)]).cpu().numpy()
            for stat in STATS + ((OUTPUTS,) if self.config.outputs else ())
        }
        first = {}
        if self._first:
            first = {key: torch.stack([self._first[b][key] for b in range(n)]).cpu().numpy()
                     for key in self._first[0]}
        data = StepData(self.expert, step, self.timestep, order, packed, first)
        self._layers, self._first = {}, {}
        return data


def apply_probe(expert_module: torch.nn.Module, expert: str, session: ProbeSession) -> None:
    """Attach the probe hooks to every quantizable layer of one expert (and its first block)."""
    HookRegistry.check_if_exists_or_initialize(expert_module).register_hook(
        _ExpertHook(session, expert), CONTEXT_HOOK_NAME)
    for name, module in quantizable_layers(expert_module):
        HookRegistry.check_if_exists_or_initialize(module).register_hook(_LayerHook(session, expert, name), HOOK_NAME)
    if session.config.first_block_inputs:
        block = expert_module.get_submodule(session.family.first_block)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_FirstBlockHook(session, expert), HOOK_NAME)
    HookRegistry.check_if_exists_or_initialize(expert_module).invalidate_child_registries_cache()


def remove_probe(expert_module: torch.nn.Module) -> None:
    """Remove every sensq probe hook from an expert; its forward is the original again."""
    registry = getattr(expert_module, "_diffusers_hook", None)
    if registry is None:
        return
    for name in (HOOK_NAME, CONTEXT_HOOK_NAME):
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()
