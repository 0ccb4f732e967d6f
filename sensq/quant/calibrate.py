"""Calibration: per layer, the clipping factor of each operand that minimizes its quantization MSE.

Branch-wise and layer-by-layer, as the method does. Each expert is calibrated on its own captured
inputs (the probe file). Inside an expert, the layers outside the transformer blocks use the probe's
captured rows; the blocks are processed in order, replaying the probe's ``blocks.0`` inputs: block i
runs with blocks 0..i-1 already quantized, the inputs of its layers are captured, their factors
chosen, the block is quantized and its outputs feed block i+1. So later layers are calibrated on
inputs that carry the realistic upstream quantization error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sensq.errors import InputError
from sensq.formats import FormatSpec, get_format
from sensq.metrics import nmse
from sensq.models.family import ModelFamily
from sensq.models.layers import input_rows
from sensq.quant.layers import fake_quantize, gemm_weight, quantize_module, swap

CALIBRATIONS = ("none", "mse")
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


@dataclass
class LayerCalibration:
    weight_clip: float = 1.0
    act_clip: float = 1.0
    weight_nmse: float | None = None
    act_nmse: float | None = None
    act_rows: int = 0


def best_clip(rows: torch.Tensor, fmt: FormatSpec, backend: str = "auto") -> tuple[float, float]:
    """The factor of :data:`CLIP_GRID` with the lowest NMSE of ``Q(clip(rows))`` against ``rows``;
    ties go to the larger factor (the format's own rule when nothing helps)."""
    best = (1.0, nmse(rows, fake_quantize(rows, fmt, 1.0, backend)))
    for clip in CLIP_GRID[1:]:
        error = nmse(rows, fake_quantize(rows, fmt, clip, backend))
        if error < best[1]:
            best = (clip, error)
    return best


def _calibrate_layer(module, weight_fmt, act_fmt, act_rows: torch.Tensor | None, backend) -> LayerCalibration:
    result = LayerCalibration()
    if weight_fmt is not None:
        result.weight_clip, result.weight_nmse = best_clip(gemm_weight(module), weight_fmt, backend)
    if act_fmt is not None:
        if act_rows is None or act_rows.numel() == 0:
            raise InputError("calibrating activations needs captured inputs: probe the model first (sensq probe)")
        result.act_clip, result.act_nmse = best_clip(act_rows.float(), act_fmt, backend)
        result.act_rows = int(act_rows.shape[0])
    return result


def _formats(row: dict) -> tuple[FormatSpec | None, FormatSpec | None]:
    weight = get_format(row["weight"]) if row["weight"] is not None else None
    activation = get_format(row["activation"]) if row["activation"] is not None else None
    return weight, activation


def calibrate_expert(expert_module: torch.nn.Module, expert: str, table: list[dict], probe, family: ModelFamily, *,
                     method: str = "mse", max_rows: int = 4096, backend: str = "auto",
                     device: torch.device | None = None,
                     progress: Callable[[str, int, int], None] | None = None) -> dict[str, LayerCalibration]:
    """Quantize one expert in place according to ``table`` (the plan's resolved rows), calibrated.

    Args:
        probe: an open ``ProbeFile`` holding this expert's captured inputs (``samples`` and, for the
            blocks, the first block's inputs).
        family: the model's family: its block list and how a block is called.
        method: ``none`` (format rule, clip 1) or ``mse``.
        max_rows: cap on the captured rows per layer used to choose the activation clip.
        device: where the blocks run (default: where the expert's parameters are; pass it when the expert
            is group-offloaded, so that the replayed inputs go to the execution device).

    Returns:
        The calibration of every quantized layer.
    """
    if method not in CALIBRATIONS:
        raise InputError(f"unknown calibration {method!r}; use one of {', '.join(CALIBRATIONS)}")
    rows = {r["layer"]: r for r in table if r["expert"] == expert and (r["weight"] or r["activation"])}
    results: dict[str, LayerCalibration] = {}
    if method == "none":
        for name, row in rows.items():
            weight_fmt, act_fmt = _formats(row)
            swap(expert_module, name, quantize_module(expert_module.get_submodule(name), weight_fmt, act_fmt, backend))
            results[name] = LayerCalibration()
        return results
    if expert not in probe.experts:
        raise InputError(f"the probe file has no captured inputs for the {expert!r} expert; probe it first")
    outside = [name for name in rows if family.block_of(name) is None]
    for name in outside:
        samples = probe.read(expert, name, "samples")
        act_rows = torch.from_numpy(samples.reshape(-1, samples.shape[-1]))[:max_rows]
        weight_fmt, act_fmt = _formats(rows[name])
        module = expert_module.get_submodule(name)
        results[name] = calib = _calibrate_layer(module, weight_fmt, act_fmt, act_rows, backend)
        swap(expert_module, name, quantize_module(module, weight_fmt, act_fmt, backend,
                                                  weight_clip=calib.weight_clip, act_clip=calib.act_clip))
    if len(outside) < len(rows):
        _calibrate_blocks(expert_module, expert, rows, probe, family, max_rows, backend, results, progress, device)
    return results


def _block_inputs(probe, expert: str, family: ModelFamily) -> list[dict[str, torch.Tensor]]:
    """Every recorded call of the first block (prompt, step, branch), by stored name, batch 1."""
    group = probe.file[f"experts/{expert}"]
    if "first_block" not in group or not len(group["first_block"]):
        raise InputError(f"block-by-block calibration needs the inputs of {family.first_block}: probe without "
                         "--no-first-block")
    names = [name for argument in family.block_arguments for name in argument.stored if name in group["first_block"]]
    arrays = {name: probe.first_block(expert, name) for name in names}
    prompts, steps, branches = arrays["hidden_states"].shape[:3]
    return [{name: torch.from_numpy(a[p, s, b]).unsqueeze(0) for name, a in arrays.items()}
            for p in range(prompts) for s in range(steps) for b in range(branches)]


def _calibrate_blocks(expert_module, expert, rows, probe, family, max_rows, backend, results, progress,
                      device=None):
    calls = _block_inputs(probe, expert, family)
    dtype = next(expert_module.parameters()).dtype
    device = device or next(expert_module.parameters()).device
    hidden = [c["hidden_states"] for c in calls]
    blocks = family.block_list(expert_module)
    generator = torch.Generator().manual_seed(0)
    for index, block in enumerate(blocks):
        names = [name for name in rows if family.block_of(name) == f"{family.blocks}.{index}"]
        captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        handles = []
        for name in names:
            module = expert_module.get_submodule(name)

            def capture(mod, args, name=name, captured=captured):
                x = args[0].detach()
                captured[name].append(input_rows(mod, x).float().cpu())

            handles.append(module.register_forward_pre_hook(capture))
        with torch.no_grad():
            try:
                for h, call in zip(hidden, calls, strict=True):
                    _run_block(family, block, h, call, dtype, device)
            finally:
                for handle in handles:
                    handle.remove()
        for name in names:
            act_rows = torch.cat(captured[name])
            if act_rows.shape[0] > max_rows:
                act_rows = act_rows[torch.randperm(act_rows.shape[0], generator=generator)[:max_rows].sort().values]
            weight_fmt, act_fmt = _formats(rows[name])
            module = expert_module.get_submodule(name)
            results[name] = calib = _calibrate_layer(module, weight_fmt, act_fmt, act_rows, backend)
            swap(expert_module, name, quantize_module(module, weight_fmt, act_fmt, backend,
                                                      weight_clip=calib.weight_clip, act_clip=calib.act_clip))
        with torch.no_grad():  # the quantized block's outputs feed the next block
            hidden = [_run_block(family, block, h, call, dtype, device).cpu()
                      for h, call in zip(hidden, calls, strict=True)]
        if progress is not None:
            progress(expert, index + 1, len(blocks))


def _run_block(family: ModelFamily, block, hidden, call, dtype, device) -> torch.Tensor:
    """One recorded block call with ``hidden`` (the previous, quantized, block's output) as its input."""
    kwargs = family.block_call({**call, "hidden_states": hidden}, dtype, device)
    return family.block_output(block(**kwargs))


def summarize_calibration(results: dict[str, dict[str, LayerCalibration]]) -> dict:
    """Mean NMSE and clip statistics per expert (for reports)."""
    out = {}
    for expert, layers in results.items():
        weights = [c.weight_nmse for c in layers.values() if c.weight_nmse is not None]
        acts = [c.act_nmse for c in layers.values() if c.act_nmse is not None]
        out[expert] = {
            "layers": len(layers),
            "clipped_weights": sum(c.weight_clip < 1 for c in layers.values()),
            "clipped_activations": sum(c.act_clip < 1 for c in layers.values()),
            "mean_weight_nmse": float(np.mean(weights)) if weights else None,
            "mean_act_nmse": float(np.mean(acts)) if acts else None,
        }
    return out
