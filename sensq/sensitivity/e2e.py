"""End-to-end sensitivity: quantize layers of the real model and measure the final latents.

Runs the probe file's own trajectory, prompts and seeds. ``leave-one-in`` quantizes one layer (or
block) and scores the final-latent NMSE against full precision; ``leave-one-out`` quantizes every
layer of the expert except one and scores how much that error drops (error with everything
quantized minus error with this one protected). Layers are swapped in and out by reference (the swap
is exact, see ``sensq.quant``).

Memory: ``leave-one-in`` builds the quantized twins of one group when it is scored and frees them
after, so the sweep needs one group's dequantized weights on top of the model (not a second copy of
the expert). ``leave-one-out`` needs every layer quantized at once: it holds them in their deployed
form (:mod:`sensq.quant.deployed`: packed codes, decoded per forward, bit-identical to the simulation
layer), about a quarter of the expert's bf16 bytes for the 4-bit formats instead of a full copy.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sensq.formats import FormatSpec
from sensq.metrics import METRICS
from sensq.models.family import ModelFamily
from sensq.quant import quantize_module, swap
from sensq.quant.deployed import deploy_module, release_scratch
from sensq.trajectory import Trajectory, apply_trajectory, run

MODES = ("leave-one-in", "leave-one-out")
GRANULARITIES = ("layer", "block")


def layer_groups(layers: list[str], granularity: str, family: ModelFamily) -> list[tuple[str, list[str]]]:
    """``layer``: one group per layer. ``block``: each of the family's blocks (``blocks.N``) groups its layers;
    others stay single."""
    if granularity == "layer":
        return [(name, [name]) for name in layers]
    groups: dict[str, list[str]] = {}
    for name in layers:
        groups.setdefault(family.block_of(name) or name, []).append(name)
    return list(groups.items())


@dataclass(frozen=True)
class E2EJob:
    trajectory: Trajectory
    prompts: list[str]
    seeds: list[int]
    negatives: list[str]


def final_latents(pipe, job: E2EJob) -> list[torch.Tensor]:
    """The final latents of every prompt of ``job`` (float32), as ``pipe`` now computes them."""
    return [run(pipe, text, job.trajectory, seed=seed, negative=negative).float()
            for text, seed, negative in zip(job.prompts, job.seeds, job.negatives, strict=True)]


def _error(latents: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    error = METRICS["e2e"].error
    return sum(error(r, x) for r, x in zip(reference, latents, strict=True)) / len(reference)


def e2e_scores(pipe, expert_module: torch.nn.Module, layers: list[str], job: E2EJob, fmt: FormatSpec, *,
               family: ModelFamily, mode: str = "leave-one-in", granularity: str = "layer", backend: str = "auto",
               progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Score every group of ``layers`` (names inside ``expert_module``); returns ``{group: value}``.

    Under ``torchrun`` the groups are split across ranks and gathered on every rank.
    """
    apply_trajectory(pipe, job.trajectory)
    reference = final_latents(pipe, job)
    groups = layer_groups(layers, granularity, family)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    mine = groups[rank::world]
    originals = {name: expert_module.get_submodule(name) for name in layers}

    def install(names, table):
        for name in names:
            swap(expert_module, name, table[name])

    scores: dict[str, float] = {}
    try:
        if mode == "leave-one-out":
            quantized = {name: deploy_module(quantize_module(module, fmt, fmt, backend))  # dense twin freed here
                         for name, module in originals.items()}
            install(layers, quantized)
            everything = _error(final_latents(pipe, job), reference)
        for done, (group, names) in enumerate(mine):
            if mode == "leave-one-in":
                install(names, {name: quantize_module(originals[name], fmt, fmt, backend) for name in names})
                scores[group] = _error(final_latents(pipe, job), reference)
                install(names, originals)  # the group's twins are dropped with the last reference
            else:
                install(names, originals)
                scores[group] = everything - _error(final_latents(pipe, job), reference)
                install(names, quantized)
            if progress is not None:
                progress(done + 1, len(mine))
    finally:
        install(layers, originals)
        release_scratch()
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        gathered: list[dict[str, float]] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, scores)
        scores = {k: v for part in gathered for k, v in part.items()}
    return {group: scores[group] for group, _ in groups}
