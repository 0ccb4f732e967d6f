"""``sensq probe``: capture per-layer, per-expert, per-step activations along a trajectory into HDF5."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from sensq.cli.common import build_trajectory, model_options, trajectory_options


@click.command()
@model_options
@trajectory_options
@click.option("--expert", default="all", show_default=True, metavar="NAME",
              help="Which expert's layers to record: a name (Wan2.2-T2V-A14B: high, low; one-expert families: "
                   "main) or all (also: both).")
@click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False), default=None,
              help="Prompt file: .txt (one per line), .json/.jsonl list, OpenS2V-Eval or OpenS2V-5M records, "
                   "VBench lists (filter one with sensq prompts). Default: 4 built-in prompts.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N prompts.")
@click.option("--tokens", type=int, default=32, show_default=True,
              help="Token rows sampled from every layer's input per step and branch (same rows every time).")
@click.option("--first-block/--no-first-block", default=True, show_default=True,
              help="Also store the full inputs of blocks.0 (what block-by-block calibration replays).")
@click.option("--outputs", is_flag=True, help="Also store every layer's output at the sampled rows: sensq rank "
              "then uses them as the full-precision reference instead of recomputing that GEMM (about 40% faster "
              "mse ranking; about as many bytes again as the samples).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("probe.h5"),
              show_default=True, help="The HDF5 file to write.")
@click.option("--resume", is_flag=True, help="Complete an interrupted file made with the same settings.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file (the old one stays until the new one holds "
              "its first complete prompt).")
@click.option("--yes", is_flag=True, help="Write the file even when its estimated size exceeds the free disk space.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def probe(**kwargs) -> None:
    """Record what every Linear (and the patch-embedding Conv3d) of each expert sees along a real
    denoising trajectory: per prompt, step and CFG branch, the per-input-channel absmax, the
    per-token absmax and a fixed subsample of input rows; plus the inputs of blocks.0.

    \b
    Examples:
      sensq probe                                        # tiny model, 4 built-in prompts, both experts
      sensq probe --expert high --preset lightning-4step --out high.h5
      sensq probe --model ./Wan2.2-T2V-A14B-Diffusers --prompts prompts.txt --limit 16 --tokens 64
      sensq probe --outputs --out probe.h5   # + layer outputs: sensq rank skips the full-precision GEMM
      torchrun --nproc-per-node 2 -m sensq.cli probe ...   # prompts sharded across ranks, merged at the end
    """
    from sensq.cli.common import load_cli_model, refuse_second_expert_options
    from sensq.probes.capture import ProbeConfig
    from sensq.probes.recorder import ProbeRequest, run_probe
    from sensq.prompts import load_prompts

    trajectory = build_trajectory(kwargs)
    if kwargs["tokens"] < 1:
        raise click.BadParameter("must be at least 1", param_hint="--tokens")
    model = load_cli_model(kwargs["model"], kwargs["device"], kwargs["dtype"], kwargs["lora_high"], kwargs["lora_low"])
    refuse_second_expert_options(model)
    prompts = load_prompts(kwargs["prompts_path"], kwargs["limit"], procedural=model.procedural)
    experts = (model.family.experts(model.pipe) if kwargs["expert"] in ("all", "both") else [kwargs["expert"]])
    request = ProbeRequest(
        model=model, trajectory=trajectory.with_resolution(model.default_resolution), prompts=prompts,
        experts=experts, out=kwargs["out"],
        config=ProbeConfig(tokens=kwargs["tokens"], first_block_inputs=kwargs["first_block"],
                           outputs=kwargs["outputs"]),
        resume=kwargs["resume"], overwrite=kwargs["overwrite"], yes=kwargs["yes"],
    )
    from sensq.probes.distributed import run_probe_sharded

    result = run_probe_sharded(request, run_probe, progress_factory=None if kwargs["as_json"] else _progress)
    if result is None:  # a non-zero rank: rank 0 reports
        return
    if kwargs["as_json"]:
        click.echo(json.dumps(dataclasses.asdict(result), indent=2))
        return
    _summary(result)


class _progress:
    """A rich progress bar over prompts x steps (on stderr, so --json output stays clean)."""

    def __init__(self, total_prompts: int, total_steps: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from sensq.cli.common import console as make_console

        self.progress = Progress(TextColumn("[bold]probe"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.description}"), TimeRemainingColumn(),
                                 console=make_console(stderr=True), transient=True)
        self.task = self.progress.add_task("", total=total_prompts * total_steps)
        self.total_steps = total_steps

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def __call__(self, event) -> None:
        self.progress.update(self.task, completed=event.prompt_done * self.total_steps + event.step,
                             description=f"prompt {event.prompt.index} step {event.step}/{event.steps}")


def _summary(result) -> None:
    from rich.table import Table

    from sensq.cli.common import console as make_console

    table = Table(title=f"probe: {result.path}")
    for column in ("expert", "layers", "steps", "branches"):
        table.add_column(column)
    for expert in result.experts:
        table.add_row(expert, str(result.layers[expert]), ",".join(map(str, result.steps[expert])),
                      ",".join(result.branches))
    console = make_console()
    console.print(table)
    console.print(
        f"prompts: {result.prompts_run} run, {result.prompts_skipped} already complete, {result.prompts_total} total; "
        f"{result.bytes_written / 1e6:.2f} MB written, file {result.file_bytes / 1e6:.2f} MB, {result.seconds:.1f} s"
    )
