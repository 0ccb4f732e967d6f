"""Denoising trajectories as data: scheduler, shift, custom sigmas, steps, guidance, resolution, seed.

A :class:`Trajectory` is applied to a pipeline with :func:`apply_trajectory` and run with
:func:`run`; :func:`plan_steps` says, before running, which expert every step goes to. The known
traps of WanPipeline are handled here once (shared/notes/wan22-diffusers.md §7):

* CFG runs only when ``guidance > 1`` (the first scale alone decides; ``guidance_2`` then applies to
  the low-noise expert). ``guidance = 1`` means one forward per step, no unconditional pass.
* The Lightning schedule needs Euler with shift 5 *and* custom sigmas [1, .75, .5, .25]; a plain
  ``FlowMatchEulerDiscreteScheduler(shift=5)`` gives different timesteps.
* Prompt embeddings are always computed with the same ``max_sequence_length`` as generation.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
from dataclasses import dataclass

import torch

from sensq.errors import InputError

SCHEDULERS = ("unipc", "euler")


@dataclass(frozen=True)
class Trajectory:
    """Everything that decides the denoising path, except the prompt and the model.

    ``shift=None`` keeps the model's own scheduler shift; ``height/width/frames=None`` take the
    model's default resolution; ``guidance_2=None`` means the same as ``guidance``.
    """

    steps: int = 4
    scheduler: str = "unipc"
    shift: float | None = None
    sigmas: tuple[float, ...] | None = None
    guidance: float = 4.0
    guidance_2: float | None = 3.0
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    seed: int = 0
    max_sequence_length: int = 512
    negative_prompt: str = ""

    def __post_init__(self):
        if self.steps < 1:
            raise InputError(f"--steps must be at least 1, got {self.steps}")
        if self.scheduler not in SCHEDULERS:
            raise InputError(f"unknown scheduler {self.scheduler!r}; use one of {', '.join(SCHEDULERS)}")
        if self.sigmas is not None:
            if self.scheduler != "euler":
                raise InputError("--sigmas needs --scheduler euler (UniPC computes its own sigmas)")
            if len(self.sigmas) != self.steps:
                raise InputError(f"--sigmas has {len(self.sigmas)} values but --steps is {self.steps}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % 16):
                raise InputError(f"--{name} must be a positive multiple of 16, got {value}")
        if self.frames is not None and (self.frames < 1 or (self.frames - 1) % 4):
            raise InputError(f"--frames must be 4k+1 (1, 5, 9, ..., 81), got {self.frames}")
        for name in ("guidance", "guidance_2", "shift"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise InputError(f"--{name.replace('_', '-')} must be a finite number, got {value!r}")
        if self.sigmas is not None and not all(math.isfinite(s) and 0 < s <= 1 for s in self.sigmas):
            raise InputError(f"--sigmas must be numbers in (0, 1], got {','.join(map(str, self.sigmas))}")
        if self.shift is not None and self.shift <= 0:
            raise InputError(f"--shift must be positive, got {self.shift}")
        if self.guidance < 1:
            raise InputError(f"--guidance must be >= 1 (1 = no classifier-free guidance), got {self.guidance}")
        if self.guidance_2 is not None and self.guidance_2 < 1:
            raise InputError(f"--guidance-2 must be >= 1, got {self.guidance_2}")
        if self.max_sequence_length < 1:
            raise InputError(f"--max-sequence-length must be at least 1, got {self.max_sequence_length}")

    @property
    def cfg(self) -> bool:
        """Whether an unconditional pass runs: WanPipeline decides on ``guidance`` alone."""
        return self.guidance > 1.0

    @property
    def branches(self) -> tuple[str, ...]:
        return ("cond", "uncond") if self.cfg else ("cond",)

    def with_resolution(self, default: tuple[int, int, int]) -> Trajectory:
        height, width, frames = default
        return dataclasses.replace(
            self, height=self.height or height, width=self.width or width, frames=self.frames or frames
        )

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["sigmas"] = list(self.sigmas) if self.sigmas is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Trajectory:
        """The trajectory a file recorded (probe, ranking, generation manifest).

        Raises:
            InputError: not an object, unknown fields, or values the trajectory refuses.
        """
        if not isinstance(data, dict):
            raise InputError(f"a recorded trajectory must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"the recorded trajectory has an unknown field {unknown[0]!r}")
        data = dict(data)
        if data.get("sigmas") is not None:
            data["sigmas"] = tuple(data["sigmas"])
        try:
            return cls(**data)
        except TypeError as error:
            raise InputError(f"the recorded trajectory is malformed: {error}") from None

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


PRESETS: dict[str, Trajectory] = {
    # Wan2.2-Lightning 4-step students: Euler, shift 5, t = [1000, 937.5, 833.3, 625], no CFG
    "lightning-4step": Trajectory(steps=4, scheduler="euler", shift=5.0, sigmas=(1.0, 0.75, 0.5, 0.25),
                                  guidance=1.0, guidance_2=1.0),
    # the original Wan2.2-T2V-A14B sampler (wan/configs/wan_t2v_A14B.py)
    "wan22-40step": Trajectory(steps=40, scheduler="unipc", shift=12.0, guidance=4.0, guidance_2=3.0),
    # a short CFG trajectory for quick checks
    "unipc-8step": Trajectory(steps=8, scheduler="unipc", shift=3.0, guidance=4.0, guidance_2=3.0),
}


def get_preset(name: str) -> Trajectory:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None


def apply_trajectory(pipe, trajectory: Trajectory) -> None:
    """Install the trajectory's scheduler on ``pipe`` (in place).

    Raises:
        InputError: a scheduler the model's family does not run (LTX-Video: Euler only).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from sensq.models.family import family_of

    family_of(pipe).check_trajectory(trajectory)
    # always start from the model's own scheduler config, not from what an earlier call installed
    if not hasattr(pipe, "_sensq_model_scheduler_config"):
        pipe._sensq_model_scheduler_config = dict(pipe.scheduler.config)
        pipe._sensq_model_scheduler_class = type(pipe.scheduler).__name__
    base = dict(pipe._sensq_model_scheduler_config)
    if trajectory.scheduler == "unipc":
        accepted = inspect.signature(UniPCMultistepScheduler.__init__).parameters
        base = {k: v for k, v in base.items() if k in accepted}  # drop another scheduler's keys
        overrides = {"prediction_type": "flow_prediction", "use_flow_sigmas": True}
        if trajectory.shift is not None:
            overrides["flow_shift"] = trajectory.shift
        scheduler = UniPCMultistepScheduler.from_config(base, **overrides)
    elif pipe._sensq_model_scheduler_class == "FlowMatchEulerDiscreteScheduler":
        # the model's own Euler config (LTX-Video: dynamic shifting); an explicit --shift replaces it
        overrides = {} if trajectory.shift is None else {"shift": trajectory.shift, "use_dynamic_shifting": False}
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(base, **overrides)
    else:
        shift = trajectory.shift if trajectory.shift is not None else base.get("flow_shift", 1.0)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=base.get("num_train_timesteps",
                                                                                              1000))
    if trajectory.scheduler == "euler" and trajectory.sigmas is not None:
        # WanPipeline.__call__ has no sigmas= argument and calls set_timesteps(steps, device=...):
        # bind the custom sigmas to this scheduler instance (the scheduler shifts them itself)
        scheduler.set_timesteps = functools.partial(scheduler.set_timesteps, sigmas=list(trajectory.sigmas))
    pipe.scheduler = scheduler


@dataclass(frozen=True)
class Step:
    index: int
    timestep: float
    sigma: float
    expert: str


def plan_steps(pipe, family, trajectory: Trajectory) -> list[Step]:
    """The steps the pipeline will run with ``trajectory`` (apply it first), and their experts."""
    import copy

    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(device="cpu", **family.schedule(pipe, trajectory))
    sigmas = scheduler.sigmas
    return [
        Step(i, float(t), float(sigmas[i]), family.route(pipe, float(t)))
        for i, t in enumerate(scheduler.timesteps)
    ]


def step_index(pipe, timestep: float) -> int:
    """0-based index of ``timestep`` in the scheduler's ``timesteps`` (set by the pipeline before its first
    forward): the step an expert forward with this timestep runs."""
    timesteps = torch.as_tensor(pipe.scheduler.timesteps, dtype=torch.float64).flatten()
    return int((timesteps - timestep).abs().argmin())


def run(pipe, prompt: str, trajectory: Trajectory, *, seed: int | None = None, callback=None,
        output_type: str = "latent", negative: str | None = None, grad: bool = False):
    """Generate one video along ``trajectory`` (already applied), returning the pipeline's frames.

    Prompt embeddings are computed by the pipeline with ``trajectory.max_sequence_length``.
    ``negative`` (a prompt's own negative prompt) overrides ``trajectory.negative_prompt``. ``grad``: run
    outside the ``torch.no_grad`` diffusers wraps ``__call__`` in (the caller enables autograd).
    """
    from sensq.models.family import family_of

    family = family_of(pipe)
    generator = torch.Generator(device="cpu").manual_seed(trajectory.seed if seed is None else seed)
    call = type(pipe).__call__
    call = getattr(call, "__wrapped__", call) if grad else call
    frames = call(
        pipe, prompt=prompt,
        negative_prompt=(negative or trajectory.negative_prompt) if trajectory.cfg else None,
        height=trajectory.height, width=trajectory.width, num_frames=trajectory.frames,
        num_inference_steps=trajectory.steps, guidance_scale=trajectory.guidance,
        max_sequence_length=trajectory.max_sequence_length, generator=generator,
        output_type=output_type, callback_on_step_end=callback, **family.call_kwargs(pipe, trajectory),
    ).frames
    return family.video_latents(pipe, frames, trajectory) if output_type == "latent" else frames
