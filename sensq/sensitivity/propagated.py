"""Propagated sensitivity: each layer's end-to-end damage, estimated to first order from a few backward passes.

A local metric measures how much a layer's own output moves under quantization (``dY = Yq - Y``); what
matters is how much of that reaches the final latents ``z`` through the residual stream, the gates, the
guidance and the remaining denoising steps. To first order the change is ``J dY`` with ``J = dz/dY`` (every
call of the layer, every step and guidance branch, summed), and leave-one-in end-to-end NMSE is
``||J dY||^2 / ||z||^2``. ``J dY`` for every layer would need one forward-mode pass per layer (the cost of
e2e itself); its squared norm does not: for a random ``v ~ N(0, I)`` shaped like ``z``,
``E[(v . J dY)^2] = ||J dY||^2``, and ``v . J dY = (J^T v) . dY`` where ``J^T v`` at *every* layer's output
comes from one backward pass. So one forward of the real trajectory with autograd on, plus ``K``
backward passes (one per projection), scores every layer of every expert; the estimate's relative spread
is about ``sqrt(2 / (K * prompts))``.

Targets (``--metric``):

* ``grad-e2e``: ``z`` is the final latents (the quantity ``e2e`` measures); the backward runs through every
  step, so the forward keeps the whole trajectory's graph (memory of a training step over the trajectory).
* ``grad-step``: ``z`` is each step's model output (the velocity the scheduler consumes); each forward's
  graph is freed right after its backward, so memory is that of one forward with autograd. It ignores
  how later steps amplify or remove the error.

``dY`` is computed in the forward from the layer's own input by its quantized twin
(:func:`sensq.quant.quantize_module`, the layer apply-plan deploys), so the error is exactly the deployed
one. The parameters do not require grad; each layer's output passes through an identity autograd function
(:class:`_Tap`) that saves ``dY`` for its backward, where the gradient arriving at the output (``J^T v``) is
dotted with it at once: no per-layer gradient is ever kept. Because ``dY`` is a saved tensor of the graph,
``checkpoint`` drops it with the rest and recomputes it, one step and one block at a time, when the backward
reaches that block.

``value``: the leave-one-in NMSE estimate (grad-e2e: steps summed before squaring; grad-step: per-step values
reduced like the local metrics); ``per_step``: each ``(step, branch)`` term alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook

from sensq.formats import FormatSpec
from sensq.models.family import ModelFamily
from sensq.models.layers import quantizable_layers
from sensq.probes.capture import ContextCatcher
from sensq.quant import quantize_module
from sensq.quant.deployed import release_scratch
from sensq.sensitivity.e2e import E2EJob
from sensq.trajectory import apply_trajectory, plan_steps, run, step_index

TARGETS = {"grad-e2e": "final", "grad-step": "step"}
"""Metric name -> what the projections are applied to."""

HOOK_NAME = "sensq_propagated"
CONTEXT_HOOK_NAME = "sensq_propagated_context"
CHECKPOINT_HOOK_NAME = "sensq_propagated_checkpoint"


@dataclass
class _Call:
    """One call of one layer: where it ran and, per guidance branch, the dot products of the current pass."""

    layer: tuple[str, str]
    step: int
    branches: tuple[int, ...]
    parts: list[float] = field(default_factory=list)

    def collect(self, grad: torch.Tensor, delta: torch.Tensor) -> None:
        """Add ``(J^T v) . dY`` per branch, ``grad`` the gradient at the layer's whole output."""
        products = (grad.float() * delta).chunk(len(self.branches))
        parts = [float(p.sum(dtype=torch.float64)) for p in products]
        self.parts = [a + b for a, b in zip(self.parts, parts, strict=True)] if self.parts else parts


class _Tap(torch.autograd.Function):
    """Identity on a layer's output whose backward dots the arriving gradient with the saved ``dY``.

    ``anchor`` is a scalar leaf that requires grad, so every tap is on the backward path even where nothing
    upstream requires grad; ``call`` is None when a checkpointed forward is recomputed (the original graph's
    taps run the backward, the recomputation only restores their saved ``dY``)."""

    @staticmethod
    def forward(ctx, output, anchor, delta, call):
        ctx.call = call
        ctx.save_for_backward(delta)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        (delta,) = ctx.saved_tensors
        if ctx.call is not None:
            ctx.call.collect(grad, delta)
        return grad, torch.zeros((), dtype=torch.float32, device=grad.device), None, None


@dataclass
class _Session:
    family: ModelFamily
    pipe: object
    branches: tuple[str, ...]
    target: str
    projections: int
    generator: torch.Generator
    context: object = None
    step: int = 0
    forward_branches: tuple[int, ...] = ()
    calls: list[_Call] = field(default_factory=list)
    sums: dict = field(default_factory=dict)
    """``(expert, layer) -> [value sum, per-step sum [steps, branches]]`` over prompts."""
    steps: int = 0
    quantized: frozenset = frozenset()
    """``(expert, layer)`` pairs that run quantized (their twin's output, gradients straight through): the
    operating point is then the quantized model's, and only these layers are scored."""
    exact: dict = field(default_factory=dict)
    """``(expert, layer) -> sum of (J^T e) . dY / scale`` for the exact direction ``e`` (:meth:`accumulate`)."""
    recording: bool = True
    """False while backward passes recompute checkpointed forwards: layers then compute the same values but
    record nothing."""
    anchor: torch.Tensor = field(default_factory=lambda: torch.zeros((), requires_grad=True))

    def scored(self, layer: tuple[str, str]) -> bool:
        return not self.quantized or layer in self.quantized

    def accumulate(self, output: torch.Tensor, scale: float, direction: torch.Tensor | None = None) -> None:
        """``K`` projections of ``output`` back to every recorded call; adds ``(v . J dY)^2 / scale`` per
        layer (all its calls summed first) and per call, then forgets the calls (their graph is freed).
        ``direction``: one more backward pass with it, adding ``(J^T direction) . dY / scale`` per layer to
        :attr:`exact`."""
        calls = self.calls
        if not calls or not output.requires_grad:
            self.calls.clear()
            return
        self.recording = False  # the backward passes may recompute checkpointed forwards
        try:
            self._project(calls, output, scale, direction)
        finally:
            self.recording = True
        self.calls.clear()

    def _project(self, calls: list[_Call], output: torch.Tensor, scale: float, direction) -> None:
        passes = self.projections + (direction is not None)
        for k in range(passes):
            if k < self.projections:
                v = torch.randn(output.shape, generator=self.generator, dtype=torch.float32)
            else:
                v = direction
            v = v.to(output.device, output.dtype)
            for call in calls:
                call.parts = []
            torch.autograd.grad(output, self.anchor, grad_outputs=v, retain_graph=k + 1 < passes, allow_unused=True)
            if k == self.projections:
                for call in calls:
                    self.exact[call.layer] = self.exact.get(call.layer, 0.0) + sum(call.parts) / scale
                continue
            totals: dict[tuple[str, str], float] = {}
            for call in calls:
                value, per_step = self.sums.setdefault(call.layer, [0.0, np.zeros((self.steps, len(self.branches)))])
                parts = call.parts or [0.0] * len(call.branches)
                for branch, part in zip(call.branches, parts, strict=True):
                    per_step[call.step, branch] += part * part / scale / self.projections
                totals[call.layer] = totals.get(call.layer, 0.0) + sum(parts)
            for layer, total in totals.items():
                self.sums[layer][0] += total * total / scale / self.projections


class _ExpertHook(ModelHook):
    _is_stateful = True

    def __init__(self, session: _Session):
        super().__init__()
        self.session = session
        self.catcher = ContextCatcher(session)

    def pre_forward(self, module, *args, **kwargs):
        session = self.session
        family = session.family
        timestep = float(torch.as_tensor(family.forward_argument(module, args, kwargs, "timestep")).flatten()[0])
        hidden = family.forward_argument(module, args, kwargs, "hidden_states")
        session.step = step_index(session.pipe, timestep)
        name = None if session.context is None else session.context.name
        carried = family.forward_branches(name, session.branches, hidden.shape[0])
        session.forward_branches = tuple(session.branches.index(b) for b in carried)
        return args, kwargs

    def post_forward(self, module, output):
        if self.session.target != "step":
            return output
        sample = output[0] if isinstance(output, tuple) else output.sample
        reference = sample.detach().float()
        scale = float(torch.sum(reference * reference, dtype=torch.float64)) or 1.0
        self.session.accumulate(sample, scale)
        detached = sample.detach()  # the next step does not extend this step's graph
        if isinstance(output, tuple):
            return (detached, *output[1:])
        output.sample = detached
        return output

    def reset_state(self, module):
        self.catcher.reset()
        return module


class _LayerHook(ModelHook):
    def __init__(self, session: _Session, expert: str, name: str, twin: torch.nn.Module):
        super().__init__()
        self.session, self.layer, self.twin = session, (expert, name), twin

    def pre_forward(self, module, *args, **kwargs):
        self.input = args[0]
        return args, kwargs

    def post_forward(self, module, output):
        """The output through a :class:`_Tap` holding ``dY``; the same operations whether recording or
        recomputing, so a checkpointed forward recomputes the same saved tensors."""
        session = self.session
        if not session.scored(self.layer):
            self.input = None
            return output
        with torch.no_grad():
            quantized = self.twin(self.input.detach())
            self.input = None
            delta = quantized.float() - output.float()
        if self.layer in session.quantized:  # the quantized value, the full-precision layer's gradient
            output = output + (quantized - output).detach()
        call = None
        if session.recording:
            call = _Call(self.layer, session.step, session.forward_branches)
            session.calls.append(call)
        return _Tap.apply(output, session.anchor, delta, call)


class _StepCheckpoint(ModelHook):
    """Each expert call under a non-reentrant ``torch.utils.checkpoint``: the trajectory's graph keeps only the
    calls' inputs and outputs, and a backward pass recomputes one step at a time."""

    def new_forward(self, module, *args, **kwargs):
        import torch.utils.checkpoint

        return torch.utils.checkpoint.checkpoint(self.fn_ref.original_forward, *args, use_reentrant=False,
                                                 **kwargs)


def propagated_scores(pipe, experts: dict[str, torch.nn.Module], job: E2EJob, fmt: FormatSpec, *,
                      family: ModelFamily, metric: str = "grad-e2e", projections: int = 4, backend: str = "auto",
                      seed: int = 0, checkpoint: bool = False,
                      progress: Callable[[int, int], None] | None = None
                      ) -> dict[str, dict[str, tuple[float, np.ndarray]]]:
    """Score every quantizable layer of ``experts`` (``{name: expert module}``) along the job's trajectory.

    Returns ``{expert: {layer: (value, per_step [trajectory steps, branches])}}``, averaged over the job's
    prompts (each prompt's terms normalized by its own ``||z||^2``). Under ``torchrun`` the prompts are split
    across ranks and the sums gathered on every rank.
    """
    if metric not in TARGETS:
        raise ValueError(f"unknown propagated metric {metric!r}; use one of {', '.join(TARGETS)}")
    return linearize(pipe, experts, job, fmt, family=family, target=TARGETS[metric], projections=projections,
                     backend=backend, seed=seed, checkpoint=checkpoint, progress=progress).scores


def quantize_twins(experts: dict[str, torch.nn.Module], fmt: FormatSpec, backend: str = "auto") -> dict:
    """``{(expert, layer): the layer's deployed W4A4 twin}`` for every quantizable layer, for :func:`linearize`."""
    return {(expert, name): quantize_module(layer, fmt, fmt, backend)
            for expert, module in experts.items() for name, layer in quantizable_layers(module)}


@dataclass
class Linearization:
    """What one pass of :func:`linearize` gives, averaged over the prompts.

    Attributes:
        scores: ``{expert: {layer: (||J dY||^2 / ||z||^2, per_step)}}``: the damage of quantizing the layer alone
            (at the full-precision point) or the change protecting it makes alone (at a quantized point).
        exact: ``{expert: {layer: (J^T e) . dY / ||z||^2}}`` at a quantized point, ``e`` the latents' error there.
        error: the measured final-latent NMSE at the operating point (0 at full precision).
    """

    scores: dict
    exact: dict
    error: float


def linearize(pipe, experts: dict[str, torch.nn.Module], job: E2EJob, fmt: FormatSpec, *, family: ModelFamily,
              target: str = "final", projections: int = 8, backend: str = "auto", seed: int = 0,
              quantized: frozenset = frozenset(), references: list[torch.Tensor] | None = None,
              checkpoint: bool = False, twins: dict | None = None,
              progress: Callable[[int, int], None] | None = None) -> Linearization:
    """One forward per prompt with autograd on, ``projections`` backward passes (and one more with the error
    direction at a quantized point); see the module docstring.

    ``quantized``: ``(expert, layer)`` pairs that run quantized (then only they are scored); ``references``: the
    full-precision final latents per prompt (needed with ``quantized``; the error is measured against them).
    ``checkpoint``: bound the memory of the graph (each expert call checkpointed, and the family's blocks
    where the model supports diffusers' gradient checkpointing): the same result, one more forward per
    backward pass. ``twins``: ``{(expert, layer): quantized twin}`` built by :func:`quantize_twins` (a caller
    that linearizes several times builds them once); missing ones are built here.
    """
    if quantized and references is None:
        raise ValueError("a quantized operating point needs the full-precision latents as references")
    apply_trajectory(pipe, job.trajectory)
    steps = len(plan_steps(pipe, family, job.trajectory))
    session = _Session(family, pipe, job.trajectory.branches, target, projections,
                       torch.Generator().manual_seed(seed), steps=steps, quantized=frozenset(quantized))
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    jobs = list(zip(job.prompts, job.seeds, job.negatives, strict=True))
    mine = list(enumerate(jobs))[rank::world]
    error = 0.0
    with _instrumented(pipe, experts, session, fmt, backend, twins, checkpoint):
        for done, (index, (text, seed_value, negative)) in enumerate(mine):
            session.generator.manual_seed(seed + index)  # the same projections whatever the sharding
            with torch.enable_grad():
                latents = run(pipe, text, job.trajectory, seed=seed_value, negative=negative, grad=True)
                if session.target == "final":
                    reference = (latents if references is None else references[index]).detach().float()
                    scale = float(torch.sum(reference * reference, dtype=torch.float64)) or 1.0
                    deviation = latents.detach().float() - reference
                    error += float(torch.sum(deviation * deviation, dtype=torch.float64)) / scale
                    session.accumulate(latents, scale, deviation if quantized else None)
            session.calls.clear()
            if progress is not None:
                progress(done + 1, len(mine))
    sums, exact, error = _gathered(session.sums, session.exact, error, world)
    count = max(len(jobs), 1)
    scores: dict[str, dict[str, tuple[float, np.ndarray]]] = {}
    directions: dict[str, dict[str, float]] = {}
    for expert, module in experts.items():
        scores[expert], directions[expert] = {}, {}
        for name, _ in quantizable_layers(module):
            if not session.scored((expert, name)):
                continue
            value, per_step = sums.get((expert, name), [0.0, np.zeros((steps, len(session.branches)))])
            scores[expert][name] = (value / count, per_step / count)
            directions[expert][name] = exact.get((expert, name), 0.0) / count
    return Linearization(scores, directions, error / count)


@contextmanager
def _instrumented(pipe, experts: dict[str, torch.nn.Module], session: _Session, fmt: FormatSpec, backend: str,
                  twins: dict | None, checkpoint: bool):
    """Parameters frozen (the text encoder's too: no graph of its own), the experts' and scored layers' hooks in
    place, and with ``checkpoint`` each expert call and the family's blocks checkpointed; all undone after."""
    modules = {id(m): m for m in [*experts.values(), *getattr(pipe, "components", {}).values()]
               if isinstance(m, torch.nn.Module)}
    frozen = [p for module in modules.values() for p in module.parameters() if p.requires_grad]
    registries = []
    checkpointed = [m for m in experts.values() if checkpoint and getattr(m, "_supports_gradient_checkpointing", False)
                    and not m.is_gradient_checkpointing]
    try:
        for p in frozen:
            p.requires_grad_(False)
        for module in checkpointed:
            module.enable_gradient_checkpointing()
        for expert, module in experts.items():
            registry = HookRegistry.check_if_exists_or_initialize(module)
            if checkpoint:
                registry.register_hook(_StepCheckpoint(), CHECKPOINT_HOOK_NAME)
            registry.register_hook(_ExpertHook(session), CONTEXT_HOOK_NAME)
            for name, layer in quantizable_layers(module):
                if session.scored((expert, name)):
                    twin = (twins or {}).get((expert, name)) or quantize_module(layer, fmt, fmt, backend)
                    HookRegistry.check_if_exists_or_initialize(layer).register_hook(
                        _LayerHook(session, expert, name, twin), HOOK_NAME)
            registry.invalidate_child_registries_cache()
            registries.append(registry)
        yield
    finally:
        session.calls.clear()
        for registry in registries:
            for name in (HOOK_NAME, CONTEXT_HOOK_NAME, CHECKPOINT_HOOK_NAME):  # absent names are skipped
                registry.remove_hook(name, recurse=True)
            registry.invalidate_child_registries_cache()
        for module in checkpointed:
            module.disable_gradient_checkpointing()
        for p in frozen:
            p.requires_grad_(True)
        release_scratch()


def _gathered(sums: dict, exact: dict, error: float, world: int) -> tuple[dict, dict, float]:
    """Under torchrun, every rank's sums, exact directions and error added up (gloo); else as they are."""
    if world <= 1:
        return sums, exact, error
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    gathered: list[tuple] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, (sums, exact, error))
    sums, exact, error = {}, {}, 0.0
    for part_sums, part_exact, part_error in gathered:
        for key, (value, per_step) in part_sums.items():
            total = sums.setdefault(key, [0.0, np.zeros_like(per_step)])
            total[0] += value
            total[1] += per_step
        for key, value in part_exact.items():
            exact[key] = exact.get(key, 0.0) + value
        error += part_error
    return sums, exact, error
