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
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N prompts.")
@click.option("--label", default=None, help="Name of this variant in manifests and reports.")
@click.option("--force", is_flag=True, help="With --plan: apply a plan made for another model.")
@click.option("--video/--no-video", default=True, show_default=True,
              help="Write {prompt}-{index}.mp4 (VBench custom-input naming; needs the video extra).")
@click.option("--fps", type=click.IntRange(min=1), default=16, show_default=True, help="Frames per second of the mp4.")
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
    from sensq.cli.common import load_cli_model, refuse_second_expert_options
    from sensq.generate import GENERATION_SCHEMA, MANIFEST, GenerateRequest
    from sensq.generate import generate as run_generate
    from sensq.plan import Plan
    from sensq.prompts import load_prompts
    from sensq.quant.apply import apply_plan
    from sensq.store.files import check_output_folder, file_digest

    trajectory = build_trajectory(kwargs)
    check_output_folder(kwargs["out"], MANIFEST, GENERATION_SCHEMA, "generation folder")  # before any work
    plan = Plan.load(kwargs["plan_file"]) if kwargs["plan_file"] is not None else None
    model = load_cli_model(kwargs["model"], kwargs["device"], kwargs["dtype"], kwargs["lora_high"], kwargs["lora_low"])
    refuse_second_expert_options(model)
    prompts = load_prompts(kwargs["prompts_path"], kwargs["limit"], procedural=model.procedural)
    plan_digest = None
    label = kwargs["label"]
    if kwargs["plan_file"] is not None:
        apply_plan(model, plan, force=kwargs["force"])
        plan_digest = file_digest(kwargs["plan_file"])
    label = label or ("fake-quant " + Path(kwargs["plan_file"]).name if kwargs["plan_file"] else model.model_id)
    request = GenerateRequest(model, trajectory.with_resolution(model.default_resolution), prompts, kwargs["out"],
                              label=label, plan_digest=plan_digest, write_video=kwargs["video"], fps=kwargs["fps"])
    if kwargs["as_json"]:
        click.echo(json.dumps(dataclasses.asdict(run_generate(request)), indent=1))
        return
    from rich.progress import Progress

    from sensq.cli.common import console as make_console

    console = make_console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("generate", total=len(prompts))
        result = run_generate(request, lambda done, total, prompt: progress.update(
            task, completed=done, description=f"prompt {prompt.index}"))
    for line in result.warnings:
        click.echo(f"warning: {line}", err=True)
    click.echo(f"{result.generated} generated ({result.seconds_per_video:.2f} s per video), {result.skipped} already "
               f"there; {result.out}")


def _dims(ctx, param, value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@click.command("eval")
@click.argument("run_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--reference", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Full-precision generations with the same prompts, seeds and trajectory: fidelity metrics.")
@click.option("--vbench", is_flag=True, help="Also score the videos with VBench (its own environment).")
@click.option("--dims", default="subject_consistency,aesthetic_quality,imaging_quality,overall_consistency,"
              "motion_smoothness", callback=_dims, show_default=True, help="VBench dimensions.")
@click.option("--vbench-python", default=None, help="Interpreter of the VBench environment [env SENSQ_VBENCH_PYTHON].")
@click.option("--vbench-cache", default=None, help="VBench weights folder [env VBENCH_CACHE_DIR, ~/.cache/vbench].")
@click.option("--torch-home", default=None, help="Holds hub/checkpoints/dino_vitbase16_pretrain.pth [env TORCH_HOME].")
@click.option("--vbench-device", default="cpu", show_default=True, help="Device VBench runs on (cpu, cuda).")
@click.option("--setup-vbench", "setup_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Create a VBench environment in this folder (pip, from PyPI) and exit.")
@click.option("--dry-run", is_flag=True, help="With --setup-vbench: print the commands instead of running them.")
@click.option("--check-vbench", is_flag=True, help="Check the VBench environment and the weights of --dims, without "
              "videos, and exit (0 ready, 1 with what is missing).")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def eval_command(run_dir, reference, vbench, dims, vbench_python, vbench_cache, torch_home, vbench_device, setup_dir,
                 dry_run, check_vbench, as_json) -> None:
    """Score a generation folder. Against full precision (--reference, offline, no weights): final-latent
    NMSE, per-frame PSNR and SSIM, first-frame error, temporal error -> RUN_DIR/scores.json. With VBench
    (--vbench): subject_consistency, aesthetic_quality, imaging_quality, overall_consistency,
    motion_smoothness, run by the VBench environment's interpreter on local weights only ->
    RUN_DIR/vbench.json. Fails, listing them, when a prompt index lacks its generation or a weight file
    is missing.

    \b
    Examples:
      sensq eval runs/hif4 --reference runs/fp
      sensq eval --setup-vbench ~/vbench-env            # once; then put the weights in VBENCH_CACHE_DIR
      sensq eval --check-vbench --vbench-python ~/vbench-env/bin/python   # ready? (no videos needed)
      sensq eval runs/hif4 --vbench --vbench-python ~/vbench-env/bin/python
    """
    from sensq.eval.vbench_eval import run_vbench, setup_commands

    if check_vbench:
        from sensq.eval.vbench_eval import check_vbench as check

        click.echo(check(dims, python=vbench_python, cache_dir=vbench_cache, torch_home=torch_home))
        return

    if setup_dir is not None:
        import shlex
        import subprocess
        import sys

        commands = setup_commands(setup_dir, sys.executable)
        for command in commands:
            click.echo(f"$ {command}")
            if not dry_run and subprocess.run(shlex.split(command)).returncode != 0:
                raise click.ClickException(f"command failed: {command}")
        if not dry_run:
            click.echo(f"VBench environment ready: --vbench-python {setup_dir / 'bin' / 'python'}")
        return
    if run_dir is None:
        raise click.UsageError("give RUN_DIR (a folder from sensq generate), or --setup-vbench DIR")
    from sensq.eval import evaluate_fidelity, evaluate_procedural, is_procedural
    from sensq.generate import load_generation

    procedural = is_procedural([text for _, text, _ in load_generation(run_dir)["config"]["prompts"]])
    if reference is None and not vbench and not procedural:
        raise click.UsageError("give --reference FP_DIR (fidelity) and/or --vbench")
    result = {}
    if procedural:
        result["procedural"] = evaluate_procedural(run_dir)
    if reference is not None:
        result["fidelity"] = evaluate_fidelity(run_dir, reference)
    if vbench:
        result["vbench"] = run_vbench(run_dir, dims, python=vbench_python, cache_dir=vbench_cache,
                                      torch_home=torch_home, device=vbench_device)
    if as_json:
        click.echo(json.dumps(result["fidelity"] if list(result) == ["fidelity"] else result, indent=1))
        return
    if "procedural" in result:
        scores = result["procedural"]["aggregate"]
        click.echo(f"procedural evaluator (exact ground truth, {len(result['procedural']['per_item'])} prompts): "
                   + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    if "fidelity" in result:
        scores = result["fidelity"]
        for note in scores.get("notes", []):
            click.echo(f"note: {note}", err=True)
        click.echo(f"{run_dir} vs {reference} ({len(scores['per_item'])} prompts):")
        for key, value in scores["aggregate"].items():
            click.echo(f"  {key:18s} mean {value['mean']:.6g}  worst {value['worst']:.6g}")
    if "vbench" in result:
        click.echo(f"VBench ({result['vbench']['videos']} videos):")
        for dimension, value in result["vbench"]["dimensions"].items():
            shown = f"{value['mean']:.4f}" if value["mean"] is not None else f"error: {value['error']}"
            click.echo(f"  {dimension:20s} {shown}")
