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
      sensq plan ranking.json --budget 10% --format nvfp4_ts --rank-format hif4 --out plan.json
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


@click.command("audit")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", required=True,
              help="The BF16 source model the files were made from: an embedded name, a diffusers folder or a Hub "
                   "id in the cache.")
@click.option("--expert", default=None,
              help="Which expert a single FILE holds (default: its name, e.g. high.gguf -> high).")
@click.option("--plan-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the files' choice as a sensq plan (each quantized layer in sensq's nearest format, "
                   "the rest kept) for sensq ablate --plans.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: the GPU if present).")
@click.option("--json", "as_json", is_flag=True, help="Print the per-layer audit as JSON.")
def audit(files, model, expert, plan_out, device, as_json) -> None:
    """Is a quantized Wan checkpoint sound, and what does it cost? Reads ComfyUI (comfy_quant) or GGUF
    files made by anyone, one per expert, dequantizes every layer with the target's own code (comfy-kitchen,
    gguf) and compares it with the source model's layer: the NMSE, and how many times the error of sensq's
    nearest format on the same weight it is (a crossed convention, such as a swapped nibble order or an
    inverted scale, shows as a ratio far above 1; the format's own rounding does not).

    \b
    Examples:
      sensq audit wan22-high-Q4_K_M.gguf wan22-low-Q4_K_M.gguf --model ./Wan2.2-T2V-A14B-Diffusers
      sensq audit high.safetensors low.safetensors --model tiny --plan-out theirs.json
      sensq ablate ranking.json --plans theirs.json --out ablation/    # what their choice costs end to end
    """
    import json

    from sensq.cli.common import load_cli_model
    from sensq.errors import InputError
    from sensq.export.audit import audit_file, audit_plan
    from sensq.store.files import check_output_file

    if expert is not None and len(files) > 1:
        raise click.UsageError("--expert names the expert of a single FILE; name several files after their experts")
    if plan_out is not None:
        from sensq.plan import PLAN_SCHEMA

        check_output_file(plan_out, PLAN_SCHEMA, "plan")
    source = load_cli_model(model, device, None)
    experts = source.family.experts(source.pipe)
    audits = []
    for path in files:
        which = expert or path.name.split(".")[0]
        if which not in experts:
            raise InputError(f"which expert is {str(path)!r}? name it after one ({', '.join(experts)}) or pass "
                             "--expert")
        audits.append(audit_file(path, source, which))
    if plan_out is not None:
        from sensq.plan import model_layers, validate_plan

        plan = audit_plan(audits, source)
        plan.layers = validate_plan(plan, model_layers(source))
        plan.save(plan_out)
    if as_json:
        click.echo(json.dumps([a.to_dict() for a in audits], indent=1))
        return
    for result in audits:
        formats: dict[str, int] = {}
        for layer in result.quantized:
            formats[layer.fmt] = formats.get(layer.fmt, 0) + 1
        worst = max((layer for layer in result.quantized if layer.ratio is not None), key=lambda item: item.ratio,
                    default=None)
        click.echo(f"{result.file} ({result.kind}, {result.expert}): " + ", ".join(
            f"{fmt} {n}" for fmt, n in sorted(formats.items())) + f" quantized, {len(result.kept)} layers kept"
            + (f"; worst layer {worst.key}: NMSE {worst.nmse:.3g} = {worst.ratio:.2f}x sensq's {worst.nearest}"
               if worst else ""))
        for layer in [layer for layer in result.quantized if layer.suspect][:10]:
            click.echo(f"  suspect: {layer.key} ({layer.fmt}): NMSE {layer.nmse:.3g}, {layer.ratio:.0f}x what "
                       f"{layer.nearest} loses on this weight: a crossed convention (nibble order, scale) or "
                       "another layer's weight", err=True)
        if result.unknown:
            click.echo(f"  {len(result.unknown)} tensors the source model does not have, e.g. {result.unknown[0]}",
                       err=True)
    if plan_out is not None:
        click.echo(f"plan written to {plan_out} (sensq ablate RANKING --plans {plan_out} measures it end to end)")
