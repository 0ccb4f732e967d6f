"""Options shared by the commands that run a model: model/device/dtype, trajectory, prompts."""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import click

from sensq.trajectory import PRESETS, SCHEDULERS, Trajectory, get_preset


def model_options(func=None, *, default_model: str | None = "tiny"):
    if func is None:
        return functools.partial(model_options, default_model=default_model)

    @click.option("--model", "model", default=default_model, show_default=default_model is not None,
                  help="Embedded model (tiny, tiny-realshape, small: Wan2.2 two experts; tiny-wan21: one-expert Wan; "
                       "tiny-ltx: LTX-Video; tiny-trained...: see sensq demo), a local diffusers folder, a sensq "
                       "checkpoint, or a Hub id already in the local cache (never downloaded).")
    @click.option("--device", default=None, help="cpu, cuda, cuda:N. Default: the GPU if present, else cpu.")
    @click.option("--dtype", default=None, type=click.Choice(["fp32", "bf16", "fp16"]),
                  help="Model dtype. Default: bf16 on GPU, fp32 on CPU.")
    @lora_options
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def console(stderr: bool = False):
    """A rich console for sensq's tables. When the output is a file or a pipe (a log, CI) and COLUMNS is unset,
    it is 160 columns wide instead of rich's 80, so that tables in logs are not cut to ellipses."""
    import os

    from rich.console import Console

    plain = Console(stderr=stderr)
    if plain.is_terminal or "COLUMNS" in os.environ:
        return plain
    return Console(stderr=stderr, width=160)


@contextlib.contextmanager
def progress_bar(title: str, *, enabled: bool = True, stream=None):
    """A rich progress bar on stderr (bar, done/total, elapsed, ETA) driven by the library's progress callbacks
    ``(label, done, total)``, one row per label (an expert, a variant). Yields None, and so shows nothing, when
    ``enabled`` is False (``--json``) or stderr is not a terminal (logs, pipes, CI)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    target = stream if stream is not None else console(stderr=True)
    if not enabled or not target.is_terminal:
        yield None
        return
    from sensq.runtime import threads_in_use

    label = f"[bold]{title}[/] [dim]{threads_in_use()} threads[/]"
    with Progress(TextColumn(label), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=target,
                  transient=True) as progress:
        tasks: dict[str, int] = {}

        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = progress.add_task(label, total=total)
            progress.update(tasks[label], completed=done, total=total)

        yield update


def refuse_unused(ctx: click.Context, used: bool, names: tuple[str, ...], why: str) -> None:
    """Refuse, in one line, options given on the command line (or the environment) that mean nothing here:
    ``used`` is False and any of ``names`` (parameter names) was given. An option left at its default passes.

    Raises:
        click.UsageError: the first such option, with ``why``.
    """
    from click.core import ParameterSource

    if used:
        return
    for name in names:
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            flag = next(p.opts[0] for p in ctx.command.params if p.name == name)
            raise click.UsageError(f"{flag} {why}")


def checkpoint_option(applies_to: str):
    """``--checkpoint``: bound the memory of a grad-e2e linearization (rank, plan --search e2e)."""
    return click.option(
        "--checkpoint", is_flag=True,
        help=f"{applies_to}: keep only each expert call's inputs and recompute steps and blocks (and each layer's "
             "quantization error) in the backward passes: the same scores, the memory of one block, about twice "
             "the compute (docs/sensitivity.md).")


def refuse_second_expert_options(model) -> None:
    """``--guidance-2`` on a model with one expert means nothing: one line, exit 2 (a preset's value passes)."""
    experts = model.family.experts(model.pipe)
    refuse_unused(click.get_current_context(), len(experts) > 1, ("guidance_2",),
                  f"is the low-noise expert's CFG scale; this {model.family.name} model has one expert "
                  f"({', '.join(experts)}): use --guidance")


def lora_options(func):
    """--lora-high/--lora-low: a few-step student shipped as LoRAs (e.g. Wan2.2-Lightning), fused at load."""

    @click.option("--lora-high", type=click.Path(exists=True, dir_okay=False), default=None,
                  help="LoRA fused into the high-noise expert (e.g. Wan2.2-Lightning high_noise_model.safetensors).")
    @click.option("--lora-low", type=click.Path(exists=True, dir_okay=False), default=None,
                  help="LoRA fused into the low-noise expert.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def load_cli_model(model: str, device: str | None, dtype: str | None, lora_high: str | None = None,
                   lora_low: str | None = None):
    """Load ``model`` on the resolved device/dtype and fuse the LoRAs given."""
    from sensq.loading import load_model
    from sensq.models.lora import fuse_loras
    from sensq.runtime import resolve_device, resolve_dtype

    resolved = resolve_device(device)
    loaded = load_model(model, resolved, resolve_dtype(dtype, resolved))
    fuse_loras(loaded, high=lora_high, low=lora_low)
    return loaded


def model_named_by_file(source, recorded_model: str, recorded_loras: dict, model: str | None,
                        lora_high: str | None, lora_low: str | None) -> str:
    """The model to load for a file (probe, ranking) that records the model and LoRAs it was made with.

    A file may come from someone else, so what it names is followed only when it is an embedded model;
    a folder, Hub id or LoRA path recorded in it is shown and must be confirmed by the user's own
    --model / --lora-high / --lora-low.

    Raises:
        InputError: the file names a non-embedded model and --model is not given, or it records LoRAs and
            neither --lora flag is given (the message spells out the flags to pass).
    """
    from sensq.errors import InputError
    from sensq.models import model_names

    if model is None:
        if recorded_model not in model_names():
            raise InputError(f"{str(source)!r} was made on model {recorded_model!r}; pass --model with that folder or "
                             "Hub id to use it (sensq does not load a model that a file names)")
        model = recorded_model
    if recorded_loras and lora_high is None and lora_low is None:
        flags = " ".join(f"--lora-{expert} {path}" for expert, path in sorted(recorded_loras.items()))
        raise InputError(f"{str(source)!r} was made with LoRAs fused; pass them yourself to use the same student: "
                         f"{flags}")
    return model


def _sigmas(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers like 1,0.75,0.5,0.25, got {value!r}") from None


def trajectory_options(func):
    @click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
                  help="A named trajectory; the options below override its fields.")
    @click.option("--steps", type=int, default=None, help="Denoising steps. [default: 4]")
    @click.option("--scheduler", type=click.Choice(list(SCHEDULERS)), default=None, help="[default: unipc]")
    @click.option("--shift", type=float, default=None, help="Flow shift. Default: the model's scheduler value.")
    @click.option("--sigmas", callback=_sigmas, default=None,
                  help="Custom sigmas for --scheduler euler, comma-separated, one per step (shifted by --shift).")
    @click.option("--guidance", type=float, default=None,
                  help="CFG scale of the high-noise expert; 1 = no unconditional pass. [default: 4]")
    @click.option("--guidance-2", "guidance_2", type=float, default=None,
                  help="CFG scale of the low-noise expert (CFG runs only when --guidance > 1). [default: 3]")
    @click.option("--height", type=int, default=None, help="Pixels, multiple of 16. Default: the model's.")
    @click.option("--width", type=int, default=None, help="Pixels, multiple of 16. Default: the model's.")
    @click.option("--frames", type=int, default=None, help="4k+1 frames. Default: the model's.")
    @click.option("--seed", type=int, default=None, help="Base seed; prompt i uses seed + i. [default: 0]")
    @click.option("--max-sequence-length", type=int, default=None,
                  help="Text tokens (the same for embedding and generation). [default: 512]")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


TRAJECTORY_FIELDS = ("steps", "scheduler", "shift", "sigmas", "guidance", "guidance_2", "height", "width", "frames",
                     "seed", "max_sequence_length")


def build_trajectory(kwargs: dict) -> Trajectory:
    """The preset (or the defaults) with every option the user gave applied on top; pops the options."""
    preset = kwargs.pop("preset")
    base = get_preset(preset) if preset else Trajectory()
    overrides = {name: kwargs.pop(name) for name in TRAJECTORY_FIELDS}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("scheduler") == "unipc" or (overrides.get("steps") and "sigmas" not in overrides
                                                 and base.sigmas is not None):
        overrides.setdefault("sigmas", None)  # custom sigmas no longer fit
    return dataclasses.replace(base, **overrides)
