"""``sensq generate`` and ``sensq eval``: matched generations and their fidelity to full precision."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from sensq.cli.common import build_trajectory, model_options, trajectory_options


@click.command()
@model_options
@trajectory_options
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), default=None,
              help="Apply this plan as fake-quant in memory (or pass a checkpoint folder as --model).")
@click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False), default=None,
              help="Prompt file (see sensq probe --help). Default: 4 built-in prompts.")
@click.option("--limit", type=int, default=None, help="Use only the first N prompts.")
@click.option("--label", default=None, help="Name of this variant in manifests and reports.")
@click.option("--video/--no-video", default=True, show_default=True,
              help="Write {prompt}-{index}.mp4 (VBench custom-input naming; needs the video extra).")
@click.option("--fps", type=int, default=16, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for this variant (one configuration per folder; reruns resume).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def generate(**kwargs) -> None:
    """Generate every prompt with matched indices, seeds, resolution, schedule and guidance; keep the
    frames (uint8 .npy), final latents and a manifest next to the videos. Rerunning skips finished items.

    \b
    Examples:
      sensq generate --out runs/fp
      sensq generate --plan plan.json --out runs/hif4          # fake-quant in memory
      sensq generate --model quantized/ --out runs/hif4-packed  # a checkpoint from sensq apply-plan
      sensq eval runs/hif4 --reference runs/fp
    """
    from sensq.generate import GenerateRequest
    from sensq.generate import generate as run_generate
    from sensq.models import load_model
    from sensq.plan import Plan
    from sensq.prompts import load_prompts
    from sensq.quant.apply import apply_plan
    from sensq.runtime import resolve_device, resolve_dtype
    from sensq.store.files import file_digest

    trajectory = build_trajectory(kwargs)
    prompts = load_prompts(kwargs["prompts_path"], kwargs["limit"])
    device = resolve_device(kwargs["device"])
    model = load_model(kwargs["model"], device, resolve_dtype(kwargs["dtype"], device))
    plan_digest = None
    label = kwargs["label"]
    if kwargs["plan_file"] is not None:
        apply_plan(model, Plan.load(kwargs["plan_file"]))
        plan_digest = file_digest(kwargs["plan_file"])
    label = label or ("fake-quant " + Path(kwargs["plan_file"]).name if kwargs["plan_file"] else model.model_id)
    request = GenerateRequest(model, trajectory.with_resolution(model.default_resolution), prompts, kwargs["out"],
                              label=label, plan_digest=plan_digest, write_video=kwargs["video"], fps=kwargs["fps"])
    if kwargs["as_json"]:
        click.echo(json.dumps(dataclasses.asdict(run_generate(request)), indent=1))
        return
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("generate", total=len(prompts))
        result = run_generate(request, lambda done, total, prompt: progress.update(
            task, completed=done, description=f"prompt {prompt.index}"))
    click.echo(f"{result.generated} generated ({result.seconds_per_video:.2f} s per video), {result.skipped} already "
               f"there; {result.out}")


@click.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--reference", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The full-precision generations with the same prompts, seeds and trajectory.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def eval_command(run_dir, reference, as_json) -> None:
    """Score a generation folder against full precision (offline, no weights): final-latent NMSE,
    per-frame PSNR and SSIM, first-frame error, temporal error. Writes RUN_DIR/scores.json. Fails,
    listing them, when a prompt index lacks its generation.

    \b
    Example:
      sensq eval runs/hif4 --reference runs/fp
    """
    from sensq.eval import evaluate_fidelity

    scores = evaluate_fidelity(run_dir, reference)
    if as_json:
        click.echo(json.dumps(scores, indent=1))
        return
    click.echo(f"{run_dir} vs {reference} ({len(scores['per_item'])} prompts):")
    for key, value in scores["aggregate"].items():
        click.echo(f"  {key:18s} mean {value['mean']:.6g}  worst {value['worst']:.6g}")
