"""``sensq apply-plan``: quantize a model by a plan (calibrated) and write a packed checkpoint."""

from __future__ import annotations

import json
import resource
import time
from collections import Counter
from pathlib import Path

import click

from sensq.cli.common import model_options
from sensq.formats import backend_names
from sensq.plan import CALIBRATIONS
from sensq.plan.calibrations import calibration_help


@click.command("apply-plan")
@click.argument("plan_file", type=click.Path(path_type=Path))
@model_options
@click.option("--probe", "probe_file", type=click.Path(path_type=Path), default=None,
              help="Probe file with the captured inputs (needed by --calibrate mse/gptq and by rules with a "
                   "'calibration' field).")
@click.option("--calibrate", type=click.Choice(CALIBRATIONS), default="none", show_default=True,
              help=calibration_help() + ". Block by block, on the probe's inputs. A plan rule's 'calibration' field "
                   "overrides it for its layers; the manifest records each layer's.")
@click.option("--sequential-experts", is_flag=True,
              help="Calibrate the low-noise expert on the trajectory produced by the already-quantized high-noise "
                   "expert (re-probes it).")
@click.option("--fake", is_flag=True, help="Store dequantized (fake-quant) weights instead of packed codes.")
@click.option("--backend", type=click.Choice(backend_names()), default="auto", show_default=True,
              help="Quantization backend (triton: fused W4A4 HiF4 linear on a GPU). Quantization is bit-exact on every "
                   "backend; the fused linear equals F.linear on the dequantized operands up to fp32 summation order.")
@click.option("--offload", is_flag=True, help="Keep only the block being calibrated on the GPU (diffusers group "
              "offloading; the rest of each expert waits on the host).")
@click.option("--pooled-experts", is_flag=True,
              help="Calibrate every expert on the captured inputs of all experts pooled (one calibration set from "
                   "the whole trajectory) instead of each on its own steps' inputs, as the study does.")
@click.option("--probe-from-another-model", is_flag=True,
              help="Calibrate on a probe made with another model on purpose (the study calibrates a 4-step student "
                   "on its 40-step teacher's trajectory); the layer names must match. The manifest records the "
                   "probe's model and trajectory under 'calibration'.")
@click.option("--force", is_flag=True, help="Apply a plan or probe made for another model.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("quantized"),
              show_default=True, help="Checkpoint folder to write: new, empty, or a sensq checkpoint (replaced only "
              "when the new one is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
def apply_plan(plan_file, model, device, dtype, lora_high, lora_low, probe_file, calibrate, sequential_experts, fake,
               backend, offload, pooled_experts, probe_from_another_model, force, out, as_json) -> None:
    """Quantize the model by the plan, expert by expert, and write a checkpoint that
    `--model DIR` (any command) and `sensq.quant.checkpoint.load_quantized(DIR)` load back.

    --out must be a new or empty folder, or a checkpoint sensq wrote (it is replaced only once the new
    one is complete); any other folder is refused and left as it is.

    \b
    Examples:
      sensq apply-plan plan.json --out quantized/
      sensq apply-plan plan.json --probe probe.h5 --calibrate mse --sequential-experts --out quantized/
      sensq apply-plan plan.json --probe probe.h5 --calibrate gptq --out quantized-gptq/
      sensq apply-plan plan.json --model tiny-deep-4step --probe teacher.h5 --probe-from-another-model --out q/
      sensq probe --model quantized/ --out after.h5      # the checkpoint is a model like any other
    """
    import torch

    from sensq.cli.common import load_cli_model, refuse_unused
    from sensq.plan import Plan
    from sensq.quant.apply import calibration_source
    from sensq.quant.calibrate import summarize_calibration
    from sensq.quant.checkpoint import CHECKPOINT_SCHEMA, save_quantized
    from sensq.store.files import check_output_folder, make_parent, output_lock
    from sensq.workflows import apply_plan as run_apply

    refuse_unused(click.get_current_context(), probe_file is not None,
                  ("sequential_experts", "pooled_experts", "probe_from_another_model"),
                  "goes with --probe (it concerns the captured inputs the layers are calibrated on)")
    plan = Plan.load(plan_file)
    refuse_unused(click.get_current_context(), calibrate != "none" or any(rule.calibration for rule in plan.rules),
                  ("sequential_experts", "pooled_experts"),
                  "goes with a calibration (--calibrate, or a plan rule's 'calibration'): nothing here is calibrated")
    check_output_folder(out, "manifest.json", CHECKPOINT_SCHEMA, "checkpoint")  # before any work
    if probe_file is not None:
        from sensq.store.probe_file import ProbeFile

        ProbeFile(probe_file).close()  # a missing, damaged or unsafe probe file is refused before loading the model
    make_parent(out)
    with output_lock(out):
        loaded = load_cli_model(model, device, dtype, lora_high, lora_low)
        device = loaded.device
        started = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        from sensq.cli.common import progress_bar
        with progress_bar(f"calibrate ({calibrate}) blocks", enabled=not as_json and probe_file is not None) as bar:
            _, calibration = run_apply(loaded, plan, probe_path=probe_file, calibrate=calibrate,
                                       sequential_experts=sequential_experts, force=force, backend=backend,
                                       offload=offload, probe_from_another_model=probe_from_another_model,
                                       pooled_experts=pooled_experts, progress=bar)
        source = calibration_source(loaded, probe_file, calibrate, sequential_experts, pooled_experts)
        manifest = save_quantized(loaded, out, plan=plan, calibration=calibration, fake=fake, lock=False,
                                  calibration_source=source)
    summary = {
        "out": str(out), "packed": manifest["packed"], "calibrate": calibrate, "sizes": manifest["sizes"],
        "calibration": summarize_calibration(calibration), "calibration_source": source,
        "layers_quantized": sum(1 for entry in manifest["layers"].values() if entry["weight"] is not None),
        "seconds": round(time.perf_counter() - started, 2),
        "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        _print_summary(summary, out)


def _print_summary(summary: dict, out) -> None:
    sizes, source = summary["sizes"], summary["calibration_source"]
    click.echo(f"checkpoint written to {out} ({'packed' if summary['packed'] else 'fake-quant'}, "
               f"calibration {summary['calibrate']}, {summary['layers_quantized']} layers quantized, "
               f"{summary['seconds']} s)")
    methods = sum((Counter(expert["methods"]) for expert in summary["calibration"].values()), Counter())
    if set(methods) - {"none"}:
        click.echo("  calibration per layer: " + ", ".join(f"{m} {n}" for m, n in sorted(methods.items())))
    if source["probe"] is not None and source["probe"]["another_model"]:
        click.echo(f"  calibrated on inputs of another model: {source['probe']['model_id']} (fingerprint "
                   f"{source['probe']['model_fingerprint']}), {source['probe']['trajectory'].get('steps')} steps; "
                   "recorded in the manifest")
    click.echo(f"  on disk {sizes['disk_bytes'] / 1e6:.3f} MB (all components); expert weights in BF16 would be "
               f"{sizes['weight_bytes_bf16'] / 1e6:.3f} MB")
    click.echo(f"  quantized weights: {sizes['quantized_params']:,} params in {sizes['quantized_weight_bytes']:,} "
               f"bytes = {sizes['effective_bits_quantized']:.3f} bits/param (metadata and tail padding included)")
    click.echo(f"  resident expert weights in the simulation: {sizes['resident_weight_bytes_simulation'] / 1e6:.3f} "
               f"MB; peak host memory {summary['peak_host_bytes'] / 1e6:.0f} MB")
