"""Run a pipeline along a trajectory over prompts and record every probed layer into a probe file."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sensq.errors import InputError, OutputError
from sensq.models import LoadedModel
from sensq.probes.capture import ProbeConfig, ProbeSession, apply_probe, remove_probe
from sensq.prompts import Prompt
from sensq.store.files import describe_os_error, output_lock
from sensq.store.probe_writer import ProbeWriter
from sensq.trajectory import Trajectory, apply_trajectory, plan_steps, run


@dataclass
class ProbeRequest:
    """A probe run. ``trajectory`` must already carry a resolution (``with_resolution``)."""

    model: LoadedModel
    trajectory: Trajectory
    prompts: list[Prompt]
    experts: list[str]
    out: Path
    config: ProbeConfig = field(default_factory=ProbeConfig)
    resume: bool = False
    overwrite: bool = False
    shard: tuple[int, int] = (0, 1)
    yes: bool = False
    """Allocate the file even when it looks larger than the free disk space."""


@dataclass
class ProbeResult:
    """What a probe run did (rendered by the CLI, or as JSON)."""

    path: str
    experts: list[str]
    layers: dict[str, int]
    steps: dict[str, list[int]]
    branches: list[str]
    prompts_total: int
    prompts_run: int
    prompts_skipped: int
    bytes_written: int
    seconds: float
    file_bytes: int


@dataclass(frozen=True)
class ProgressEvent:
    prompt_done: int
    prompt_total: int
    step: int
    steps: int
    prompt: Prompt


def _run_digest(request: ProbeRequest, seeds: list[int]) -> str:
    payload = {
        "model": request.model.fingerprint, "trajectory": request.trajectory.to_dict(),
        "config": request.config.__dict__, "experts": request.experts, "seeds": seeds,
        "prompts": [[p.index, p.text, p.negative] for p in request.prompts], "shard": list(request.shard),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _check_output(request: ProbeRequest, digest: str) -> bool:
    """Validate ``--out``; returns True when an existing file is to be resumed."""
    out = request.out
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder {str(parent)!r} is not writable")
    if not out.exists():
        return False
    if request.overwrite:  # the old file stays until the new one holds its first complete prompt
        return False
    if not request.resume:
        raise InputError(f"{str(out)!r} exists; pass --resume to complete it or --overwrite to replace it")
    from sensq.store.probe_file import ProbeFile

    with ProbeFile(out) as existing:
        found = existing.file.attrs.get("run_digest")
    if found != digest:
        raise InputError(
            f"{str(out)!r} was made with a different model, trajectory, prompt list or probe config "
            f"(run digest {found} != {digest}); use --overwrite to replace it or another --out"
        )
    return True


def run_probe(request: ProbeRequest, progress: Callable[[ProgressEvent], None] | None = None) -> ProbeResult:
    """Probe while holding the output's lock (a second probe into the same file is refused); see
    :func:`_run_probe`."""
    with output_lock(request.out):
        try:
            return _run_probe(request, progress)
        except OSError as error:  # a full disk before the first step (the file's tables)
            raise OutputError(describe_os_error(error, request.out)) from None


def _route(request: ProbeRequest) -> tuple[list, dict[str, list[int]]]:
    """Install the trajectory and say which steps go to which requested expert.

    Raises:
        InputError: an unknown expert, a resolution the family refuses, an expert no step is routed to.
    """
    model, trajectory = request.model, request.trajectory
    pipe, family = model.pipe, model.family
    available = family.experts(pipe)
    for expert in request.experts:
        if expert not in available:
            raise InputError(f"unknown expert {expert!r}; this model has: {', '.join(available)}")
    apply_trajectory(pipe, trajectory)
    family.check_resolution(pipe, trajectory.height, trajectory.width, trajectory.frames, model.dtype, model.device)
    steps = plan_steps(pipe, family, trajectory)
    expert_steps = {e: [s.index for s in steps if s.expert == e] for e in request.experts}
    for expert, indices in expert_steps.items():
        if not indices:
            timesteps = ", ".join(f"{s.timestep:g}" for s in steps)
            boundary = family.boundary_timestep(pipe)
            raise InputError(
                f"the trajectory never routes a step to the {expert!r} expert (timesteps {timesteps}"
                + (f"; boundary t={boundary:g}" if boundary is not None else "") + "); use more steps or another "
                f"schedule, or --expert {' or '.join(e for e in available if e != expert)}"
            )
    return steps, expert_steps


def _open_writer(request: ProbeRequest, steps: list, expert_steps: dict[str, list[int]], seeds: list[int]):
    """The probe file's writer: the existing file resumed (same run digest) or a new one."""
    model, trajectory = request.model, request.trajectory
    digest = _run_digest(request, seeds)
    if _check_output(request, digest):
        return ProbeWriter.resume(request.out)
    attrs = {
        "model_id": model.model_id, "model_fingerprint": model.fingerprint, "loras": dict(model.loras),
        "trajectory": trajectory.to_dict(), "probe_config": request.config.__dict__,
        "run_digest": digest, "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
        "shard": list(request.shard), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return ProbeWriter.create(request.out, attrs=attrs, prompts=request.prompts, seeds=seeds, steps=steps,
                              expert_steps=expert_steps, branches=trajectory.branches)


class _StepRecorder:
    """The pipeline's step-end callback: writes what the probe session captured at each step of the prompt being
    run (``slot``, ``prompt``) for the expert that ran it, creating the expert's layer table on first use."""

    def __init__(self, request: ProbeRequest, writer, session: ProbeSession, steps, expert_steps: dict,
                 progress: Callable[[ProgressEvent], None] | None):
        self.request, self.writer, self.session, self.steps, self.progress = request, writer, session, steps, progress
        self.expert_steps = expert_steps
        self.local_step = {e: {step: k for k, step in enumerate(indices)} for e, indices in expert_steps.items()}
        self.bytes_written = 0
        self.prompts_run = 0
        self.slot: int = 0
        self.prompt: Prompt | None = None

    def __call__(self, _pipe, i, _t, callback_kwargs):
        expert = self.steps[i].expert
        if expert in self.expert_steps:
            self._record(expert, i)
        if self.progress is not None:
            self.progress(ProgressEvent(self.prompts_run, len(self.request.prompts), i + 1, len(self.steps),
                                        self.prompt))
        return callback_kwargs

    def _record(self, expert: str, i: int) -> None:
        data = self.session.take_step(i)
        writer = self.writer
        if writer.building and not writer.has_layers(expert):
            shapes = {name: self.session.layer_meta[(expert, name)] for name in data.order}
            writer.create_layers(expert, shapes, {k: v.shape[1:] for k, v in data.first_block.items()},
                                 outputs=self.request.config.outputs, yes=self.request.yes)
        for stat, array in [*data.packed.items(), *data.first_block.items()]:
            if not np.isfinite(array).all():
                raise InputError(
                    f"the model produced NaN or Inf activations ({stat}, {expert} expert, prompt {self.prompt.index}, "
                    f"step {i}); nothing of this prompt was recorded: probe in fp32 (--dtype fp32) or check the "
                    "model's weights")
        self.bytes_written += writer.write_step(self.slot, expert, self.local_step[expert][i], data.packed,
                                                data.first_block)


def _run_probe(request: ProbeRequest, progress: Callable[[ProgressEvent], None] | None = None) -> ProbeResult:
    """Probe ``request.experts`` along the trajectory for every prompt; resumable.

    Raises:
        InputError: no step of the trajectory runs on a requested expert; output problems (see
            :func:`_check_output`); unknown expert.
    """
    started = time.perf_counter()
    model, trajectory = request.model, request.trajectory
    pipe, family = model.pipe, model.family
    steps, expert_steps = _route(request)
    seeds = [trajectory.seed + p.index for p in request.prompts]
    writer = _open_writer(request, steps, expert_steps, seeds)
    session = ProbeSession(request.config, trajectory.branches, family)
    done = writer.file["prompts/done"][...]
    recorder = _StepRecorder(request, writer, session, steps, expert_steps, progress)
    for name in request.experts:
        apply_probe(family.expert_module(pipe, name), name, session)
    completed = False
    try:
        for slot, prompt in enumerate(request.prompts):
            if done[slot]:
                continue
            recorder.slot, recorder.prompt = slot, prompt
            run(pipe, prompt.text, trajectory, seed=seeds[slot], callback=recorder, negative=prompt.negative)
            writer.finish_prompt(slot)
            recorder.prompts_run += 1
        completed = True
    except OSError as error:  # a full disk: the prompts marked done are kept, the same command resumes
        raise OutputError(describe_os_error(error, request.out, needed=writer.planned_bytes)) from None
    finally:
        for name in request.experts:
            remove_probe(family.expert_module(pipe, name))
        writer.close(failed=not completed)
    prompts_run, bytes_written = recorder.prompts_run, recorder.bytes_written
    layers = {}
    from sensq.store.probe_file import ProbeFile

    with ProbeFile(request.out) as probe:
        layers = {e: len(probe.layers(e)) for e in request.experts}
    return ProbeResult(
        path=str(request.out), experts=list(request.experts), layers=layers, steps=expert_steps,
        branches=list(trajectory.branches), prompts_total=len(request.prompts), prompts_run=prompts_run,
        prompts_skipped=int(done.sum()), bytes_written=bytes_written,
        seconds=time.perf_counter() - started, file_bytes=request.out.stat().st_size,
    )
