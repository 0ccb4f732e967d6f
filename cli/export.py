"""``sensq export``: a sensq checkpoint as ComfyUI or GGUF files, one per expert, in Wan's own key names."""

from __future__ import annotations

from pathlib import Path

import click

from sensq.export import TARGETS


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--to", "target", type=click.Choice(sorted(TARGETS)), required=True,
              help="; ".join(f"{name}: {TARGETS[name].help}" for name in sorted(TARGETS)) + ".")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for one file per expert (high, low; main for one-expert models) and export.json, the "
                   "per-layer report: new, empty, or an export sensq wrote.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-layer report as JSON.")
def export(checkpoint, target, out, as_json) -> None:
    """Write the checkpoint sensq measured (sensq apply-plan) as the files ComfyUI loads natively or
    ComfyUI-GGUF loads, in the original Wan key names (blocks.N.self_attn.q, ffn.0, head.head, ...).

    sensq's calibrated codes are kept wherever the target's layout holds them (GPTQ included); where the
    target re-rounds something (GGUF's FP16 block scale), export.json gives each layer's NMSE against
    sensq's deployed weight, measured with the target's own dequantizer. A format the target has no layout
    for is refused, naming the nearest one and how to plan for it; layers sensq kept in high precision are
    written in the dtype it ran them in. Activations: the target's runtime decides (GGUF is weight-only).

    \b
    Examples:
      sensq plan ranking.json --budget 10% --format nvfp4_ts --out plan.json
      sensq apply-plan plan.json --probe probe.h5 --calibrate gptq --out ckpt/
      sensq export ckpt/ --to comfyui --out comfy/     # comfy/high.safetensors, comfy/low.safetensors
      sensq export ckpt-int4/ --to gguf --out gguf/    # from a plan with --format int4@32 (Q4_0)
    """
    from sensq.cli.common import progress_bar
    from sensq.export import export_checkpoint, summary_json

    with progress_bar("export", enabled=not as_json) as progress:
        result = export_checkpoint(checkpoint, target, out, progress=progress)
    if as_json:
        click.echo(summary_json(result))
        return
    for expert, name in result.files.items():
        rows = [row for row in result.layers if row["expert"] == expert]
        kinds: dict[str, int] = {}
        for row in rows:
            kinds[row["target_type"]] = kinds.get(row["target_type"], 0) + 1
        rerounded = [row["nmse_vs_sensq"] for row in rows if row["nmse_vs_sensq"]]
        click.echo(f"{expert}: {Path(result.out) / name}: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
                   + " quantized layers, the rest as sensq kept them"
                   + (f"; {len(rerounded)} re-rounded by the target, NMSE vs sensq's weight up to "
                      f"{max(rerounded):.2e}" if rerounded else "; every code and scale as sensq deployed it"))
    click.echo(f"per-layer report: {Path(result.out) / 'export.json'} ({result.seconds} s)")
