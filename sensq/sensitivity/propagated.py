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
one. The parameters do not require grad; a zero tensor that does is added to each layer's output, and
``J^T v`` is its gradient (the gradient with respect to the output itself).

``value`` is the leave-one-in NMSE estimate (``grad-e2e``: all steps summed before squaring, cross-step terms
included; ``grad-step``: per-step values reduced like the local metrics); ``per_step`` holds each
``(step, branch)`` term alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
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
from sensq.trajectory import apply_trajectory, run

TARGETS = {"grad-e2e": "final", "grad-step": "step"}
"""Metric name -> what the projections are applied to."""

HOOK_NAME = "sensq_propagated"
CONTEXT_HOOK_NAME = "sensq_propagated_context"


@dataclass
class _Call:
    """One call of one layer: where it ran, its output's quantization error and the zero added to its output."""

    layer: tuple[str, str]
    step: int
    branches: tuple[int, ...]
    delta: torch.Tensor
    zero: torch.Tensor


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

    def accumulate(self, output: torch.Tensor, scale: float) -> None:
        """``K`` projections of ``output`` back to every recorded call; adds ``(v . J dY)^2 / scale`` per
        layer (all its calls summed first) and per call, then forgets the calls (their graph is freed)."""
        calls = [c for c in self.calls if c.zero.requires_grad]
        if not calls:
            self.calls.clear()
            return
        zeros = [c.zero for c in calls]
        for k in range(self.projections):
            v = torch.randn(output.shape, generator=self.generator, dtype=torch.float32).to(output.device,
                                                                                             output.dtype)
            grads = torch.autograd.grad(output, zeros, grad_outputs=v, retain_graph=k + 1 < self.projections,
                                        allow_unused=True)
            totals: dict[tuple[str, str], float] = {}
            for call, grad in zip(calls, grads, strict=True):
                value, per_step = self.sums.setdefault(call.layer, [0.0, np.zeros((self.steps, len(self.branches)))])
                if grad is None:
                    parts = [0.0] * len(call.branches)
                else:
                    products = (grad.float() * call.delta).chunk(len(call.branches))
                    parts = [float(p.sum(dtype=torch.float64)) for p in products]
                for branch, part in zip(call.branches, parts, strict=True):
                    per_step[call.step, branch] += part * part / scale / self.projections
                totals[call.layer] = totals.get(call.layer, 0.0) + sum(parts)
            for layer, total in totals.items():
                self.sums[layer][0] += total * total / scale / self.projections
        self.calls.clear()


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
        timesteps = torch.as_tensor(session.pipe.scheduler.timesteps, dtype=torch.float64).flatten()
        session.step = int((timesteps - timestep).abs().argmin())
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
        with torch.no_grad():
            delta = (self.twin(self.input.detach()).float() - output.detach().float())
        self.input = None
        zero = torch.zeros_like(output, requires_grad=True)
        self.session.calls.append(_Call(self.layer, self.session.step, self.session.forward_branches, delta, zero))
        return output + zero


def propagated_scores(pipe, experts: dict[str, torch.nn.Module], job: E2EJob, fmt: FormatSpec, *,
                      family: ModelFamily, metric: str = "grad-e2e", projections: int = 4, backend: str = "auto",
                      seed: int = 0, progress: Callable[[int, int], None] | None = None
                      ) -> dict[str, dict[str, tuple[float, np.ndarray]]]:
    """Score every quantizable layer of ``experts`` (``{name: expert module}``) along the job's trajectory.

    Returns ``{expert: {layer: (value, per_step [trajectory steps, branches])}}``, averaged over the job's
    prompts (each prompt's terms normalized by its own ``||z||^2``). Under ``torchrun`` the prompts are split
    across ranks and the sums gathered on every rank.
    """
    if metric not in TARGETS:
        raise ValueError(f"unknown propagated metric {metric!r}; use one of {', '.join(TARGETS)}")
    apply_trajectory(pipe, job.trajectory)
    from sensq.trajectory import plan_steps

    steps = len(plan_steps(pipe, family, job.trajectory))
    session = _Session(family, pipe, job.trajectory.branches, TARGETS[metric], projections,
                       torch.Generator().manual_seed(seed), steps=steps)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    jobs = list(zip(job.prompts, job.seeds, job.negatives, strict=True))
    mine = list(enumerate(jobs))[rank::world]
    frozen = [p for module in experts.values() for p in module.parameters() if p.requires_grad]
    registries = []
    try:
        for p in frozen:
            p.requires_grad_(False)
        for expert, module in experts.items():
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(_ExpertHook(session), CONTEXT_HOOK_NAME)
            for name, layer in quantizable_layers(module):
                twin = quantize_module(layer, fmt, fmt, backend)
                HookRegistry.check_if_exists_or_initialize(layer).register_hook(
                    _LayerHook(session, expert, name, twin), HOOK_NAME)
            registry.invalidate_child_registries_cache()
            registries.append(registry)
        for done, (index, (text, seed_value, negative)) in enumerate(mine):
            session.generator.manual_seed(seed + index)  # the same projections whatever the sharding
            with torch.enable_grad():
                latents = run(pipe, text, job.trajectory, seed=seed_value, negative=negative, grad=True)
                if session.target == "final":
                    reference = latents.detach().float()
                    session.accumulate(latents, float(torch.sum(reference * reference, dtype=torch.float64)) or 1.0)
            session.calls.clear()
            if progress is not None:
                progress(done + 1, len(mine))
    finally:
        session.calls.clear()
        for registry in registries:
            for name in (HOOK_NAME, CONTEXT_HOOK_NAME):
                registry.remove_hook(name, recurse=True)
            registry.invalidate_child_registries_cache()
        for p in frozen:
            p.requires_grad_(True)
        release_scratch()
    sums = session.sums
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        gathered: list[dict] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, sums)
        sums = {}
        for part in gathered:
            for key, (value, per_step) in part.items():
                total = sums.setdefault(key, [0.0, np.zeros_like(per_step)])
                total[0] += value
                total[1] += per_step
    count = max(len(jobs), 1)
    out: dict[str, dict[str, tuple[float, np.ndarray]]] = {}
    for expert, module in experts.items():
        out[expert] = {}
        for name, _ in quantizable_layers(module):
            value, per_step = sums.get((expert, name), [0.0, np.zeros((steps, len(session.branches)))])
            out[expert][name] = (value / count, per_step / count)
    return out

