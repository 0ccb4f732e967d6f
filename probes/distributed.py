"""Probing on several processes: ``torchrun`` ranks shard the prompts, each writes its own part
file, and rank 0 merges the parts into the requested output once every rank is done."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

from sensq.store.merge import merge_probe_files


def part_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.stem}.rank{rank}-of-{world}{out.suffix}")


def run_probe_sharded(request, runner, progress_factory=None):
    """Run ``runner(request, progress)`` on this rank's prompts (all of them without torchrun).

    Returns the result on rank 0 (for the merged file under torchrun), ``None`` on other ranks.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    steps = request.trajectory.steps
    if world == 1:
        with progress_factory(len(request.prompts), steps) if progress_factory else contextlib.nullcontext() as bar:
            return runner(request, bar)
    import torch.distributed as dist

    if request.out.exists() and not request.overwrite:
        from sensq.errors import InputError

        raise InputError(f"{str(request.out)!r} exists; pass --overwrite to replace it (parts resume with --resume)")
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # only barriers cross processes: gloo works on any device
    shard = dataclasses.replace(request, prompts=request.prompts[rank::world],
                                out=part_path(request.out, rank, world), shard=(rank, world))
    show = progress_factory if rank == 0 else None
    with show(len(shard.prompts), steps) if show else contextlib.nullcontext() as bar:
        result = runner(shard, bar)
    import torch

    counts = torch.tensor([result.prompts_run, result.prompts_skipped, result.bytes_written], dtype=torch.int64)
    dist.all_reduce(counts)  # also a barrier: every part is closed after this
    merged = None
    if rank == 0:
        parts = [part_path(request.out, r, world) for r in range(world)]
        merge_probe_files(parts, request.out)
        for part in parts:
            part.unlink()
        run, skipped, written = counts.tolist()
        merged = dataclasses.replace(result, path=str(request.out), prompts_total=len(request.prompts),
                                     prompts_run=run, prompts_skipped=skipped, bytes_written=written,
                                     file_bytes=request.out.stat().st_size)
    dist.barrier()
    dist.destroy_process_group()
    return merged
