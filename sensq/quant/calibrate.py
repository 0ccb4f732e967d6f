"""Calibration: per layer, how each operand is rounded, chosen on the layer's captured inputs.

Methods (``--calibrate``, or a plan rule's ``calibration`` field for its layers):

* ``none``: the format's own rule (clip factor 1).
* ``mse``: per operand, the clipping factor of :data:`CLIP_GRID` with the lowest quantization NMSE; the
  whole curve is kept (``LayerCalibration.weight_curve``/``act_curve``, in the checkpoint manifest), so a
  search that never moves shows why (on HiF4 the E6M2 scale moves in steps of 12.5-25%, and the
  hierarchical lv2/lv3 levels already fit each 8- and 4-element group: clipping the largest values of a
  trained layer rarely pays).
* ``gptq``: activations as ``mse``; 4-bit weights rounded by GPTQ onto the format's grid
  (:mod:`sensq.quant.gptq`) on the layer's captured inputs, error propagated column by column. Weights
  in other formats (an 8-bit tier) are calibrated as ``mse``; the manifest records each layer's method.
* ``rotate``: an activation-outlier method. Both operands of a Linear are multiplied by a block-diagonal
  Hadamard rotation of size 64 (:func:`sensq.quant.layers.rotate`; orthogonal, so the product is unchanged)
  before the format's own rule quantizes them: an outlier channel is spread over the 64 channels of its
  block, which share one scale anyway. Needs no captured inputs. Layers it cannot rotate (the patch
  embedding, widths that are not a multiple of 64) get ``none``.
* ``rotate-gptq``: the rotation, then ``gptq`` on the rotated operands (``mse`` where GPTQ does not apply).

Branch-wise and layer-by-layer, as the method does. Each expert is calibrated on its own captured
inputs (the probe file). Inside an expert, the layers outside the transformer blocks use the probe's
captured rows; the blocks are processed in order, replaying the probe's ``blocks.0`` inputs: block i
runs with blocks 0..i-1 already quantized, the inputs of its layers are captured, their factors
chosen, the block is quantized and its outputs feed block i+1. So later layers are calibrated on
inputs that carry the realistic upstream quantization error.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook

from sensq.errors import InputError
from sensq.formats import FormatSpec, PackedTensor, get_format, unpack
from sensq.metrics import nmse
from sensq.models.family import ModelFamily
from sensq.models.layers import input_rows
from sensq.plan import calibrations
from sensq.plan.calibrations import METHODS, needs_data
from sensq.plan.layer_config import LayerConfig
from sensq.quant.gptq import gptq_pack, gptq_refusal
from sensq.quant.layers import ROTATION_BLOCK, fake_quantize, gemm_weight, quantize_module, rotate, swap

CLIP_GRID = (1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.9, 0.875, 0.85, 0.825, 0.8, 0.75,
             0.7, 0.65, 0.6, 0.55, 0.5)
"""Clip factors searched by ``mse``: steps of 1% near 1 (where a trained layer's best factor lies when
clipping helps at all), coarser below."""


@dataclass
class LayerCalibration:
    method: str = "none"
    weight_clip: float = 1.0
    act_clip: float = 1.0
    weight_nmse: float | None = None
    act_nmse: float | None = None
    act_rows: int = 0
    weight_curve: list[tuple[float, float]] | None = None
    act_curve: list[tuple[float, float]] | None = None
    rotation: int | None = None
    weight_packed: PackedTensor | None = field(default=None, repr=False)

    def manifest_entry(self) -> dict:
        """What a checkpoint manifest records of it (JSON)."""
        entry = {"calibration": self.method, "weight_nmse": self.weight_nmse, "act_nmse": self.act_nmse,
                 "act_rows": self.act_rows}
        for name, curve in (("weight_clip_curve", self.weight_curve), ("act_clip_curve", self.act_curve)):
            if curve is not None:
                entry[name] = [[clip, error] for clip, error in curve]
        return entry


def clip_curve(rows: torch.Tensor, fmt: FormatSpec, backend: str = "auto") -> list[tuple[float, float]]:
    """NMSE of ``Q(clip(rows))`` against ``rows`` for every factor of :data:`CLIP_GRID`."""
    return [(clip, nmse(rows, fake_quantize(rows, fmt, clip, backend))) for clip in CLIP_GRID]


def best_clip(rows: torch.Tensor, fmt: FormatSpec, backend: str = "auto") -> tuple[float, float]:
    """The factor of :data:`CLIP_GRID` with the lowest NMSE of ``Q(clip(rows))`` against ``rows``;
    ties go to the larger factor (the format's own rule when nothing helps)."""
    return _best(clip_curve(rows, fmt, backend))


def _best(curve: list[tuple[float, float]]) -> tuple[float, float]:
    best = curve[0]
    for clip, error in curve[1:]:
        if error < best[1]:
            best = (clip, error)
    return best


@dataclass
class WeightRounding:
    """What a weight step chose for one layer: a clip factor of the format's own rule, or codes of its own
    (``packed``, stored and deployed as they are), the weight NMSE, and the label the layer records (a step
    that cannot round this format and did something else says what: GPTQ on an 8-bit format: ``mse``)."""

    applied: str
    clip: float = 1.0
    nmse: float | None = None
    curve: list[tuple[float, float]] | None = None
    packed: PackedTensor | None = None


WeightStep = Callable[[torch.Tensor, torch.Tensor, FormatSpec, str, torch.dtype], WeightRounding]
"""``(weight [out, in] float32 (rotated when the method rotates), captured input rows [n, in], format, backend,
the layer's dtype) -> WeightRounding``."""

_WEIGHT_STEPS: dict[str, WeightStep] = {}


def register_weight_step(name: str, step: WeightStep, *, needs_data: bool = True) -> None:
    """Add a way of rounding weights: a :class:`sensq.plan.calibrations.Calibration` names it as ``weights``.
    What it returns is what the deployed layer applies (the clip factor, or its packed codes) and what the
    checkpoint stores; nothing else has to change."""
    calibrations.WEIGHT_STEPS[name] = needs_data
    _WEIGHT_STEPS[name] = step


def unregister_weight_step(name: str) -> None:
    """Remove a step added by :func:`register_weight_step` (tests)."""
    calibrations.WEIGHT_STEPS.pop(name, None)
    _WEIGHT_STEPS.pop(name, None)


def _mse_weights(weight, rows, fmt, backend, dtype) -> WeightRounding:
    curve = clip_curve(weight, fmt, backend)
    clip, error = _best(curve)
    return WeightRounding("mse", clip, error, curve)


def _gptq_weights(weight, rows, fmt, backend, dtype) -> WeightRounding:
    if gptq_refusal(fmt) is not None:  # GPTQ does not round this format: the MSE clip instead
        return _mse_weights(weight, rows, fmt, backend, dtype)
    packed = gptq_pack(weight, rows, fmt, dtype=dtype)
    return WeightRounding("gptq", nmse=nmse(weight, unpack(packed).float()), packed=packed)


register_weight_step("mse", _mse_weights)
register_weight_step("gptq", _gptq_weights)


def _calibrate_layer(module, weight_fmt, act_fmt, act_rows: torch.Tensor | None, backend,
                     name: str) -> LayerCalibration:
    result = LayerCalibration()
    method = METHODS[name]
    if method.rotate and isinstance(module, torch.nn.Linear) and gemm_weight(module).shape[1] % ROTATION_BLOCK == 0:
        result.rotation = ROTATION_BLOCK
    rotated = result.rotation is not None
    result.method = method.applied(rotated, method.weights)
    if method.needs_data:
        if act_rows is None or act_rows.numel() == 0:
            raise InputError("calibrating needs captured inputs: probe the model first (sensq probe)")
        act_rows = rotate(act_rows.float(), result.rotation)
        result.act_rows = int(act_rows.shape[0])
        if act_fmt is not None and method.activations == "mse":
            result.act_curve = clip_curve(act_rows, act_fmt, backend)
            result.act_clip, result.act_nmse = _best(result.act_curve)
    else:
        act_rows = None
    if weight_fmt is None or method.weights == "none":
        return result
    weight = rotate(gemm_weight(module), result.rotation)
    rounding = _WEIGHT_STEPS[method.weights](weight, act_rows, weight_fmt, backend, module.weight.dtype)
    result.method = method.applied(rotated, rounding.applied)
    result.weight_clip, result.weight_nmse, result.weight_curve = rounding.clip, rounding.nmse, rounding.curve
    result.weight_packed = rounding.packed
    return result


CAPTURE_HOOK = "sensq_calibration_capture"


class _InputCapture(ModelHook):
    """Keeps the input rows of each call of one layer (diffusers' hook, as every sensq hook)."""

    def __init__(self, into: list):
        super().__init__()
        self.into = into

    def pre_forward(self, module, *args, **kwargs):
        self.into.append(input_rows(module, args[0].detach()).float().cpu())
        return args, kwargs


@contextmanager
def capturing_inputs(root: torch.nn.Module, names: list[str]):
    """``{name: [input rows of each call]}`` of the named layers of ``root``, filled while the block runs; the
    hooks are removed after it."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    registries = []
    try:
        for name in names:
            registry = HookRegistry.check_if_exists_or_initialize(root.get_submodule(name))
            registry.register_hook(_InputCapture(captured[name]), CAPTURE_HOOK)
            registries.append(registry)
        yield captured
    finally:
        for registry in registries:
            registry.remove_hook(CAPTURE_HOOK, recurse=False)


def calibrate_and_swap(root: torch.nn.Module, name: str, row: LayerConfig, act_rows: torch.Tensor | None, backend: str,
                       method: str) -> LayerCalibration:
    """Calibrate layer ``name`` of ``root`` by ``method`` for its resolved plan ``row`` (on ``act_rows`` when the
    method needs data) and swap in the quantized layer that applies the result."""
    weight_fmt, act_fmt = _formats(row)
    module = root.get_submodule(name)
    calib = _calibrate_layer(module, weight_fmt, act_fmt, act_rows, backend, method)
    swap(root, name, quantize_module(module, weight_fmt, act_fmt, backend, weight_clip=calib.weight_clip,
                                     act_clip=calib.act_clip, weight_packed=calib.weight_packed,
                                     rotation=calib.rotation))
    return calib


def calibrate_on_loop(root: torch.nn.Module, rows: dict[str, LayerConfig], methods: dict[str, str],
                      forward_loop: Callable[[torch.nn.Module], None] | None, backend: str,
                      pick: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, LayerCalibration]:
    """Quantize the layers ``rows`` of ``root`` (by name, each with its calibration method in ``methods``): when
    some method needs data, ``forward_loop(root)`` runs once in full precision while each such layer's input rows
    are captured, ``pick`` chooses the rows it calibrates on; then every layer is calibrated and swapped, in
    order. What ``sensq.quantize_`` does for a module, and apply-plan for each block of an expert.

    Raises:
        InputError: a method that needs data without a ``forward_loop``, a layer the loop never ran.
    """
    wanted = [name for name in rows if needs_data(methods[name])]
    if wanted and forward_loop is None:
        raise InputError(f"calibration {methods[wanted[0]]!r} needs data: pass forward_loop (a function that runs "
                         "the module on calibration inputs)")
    with capturing_inputs(root, wanted) as captured, torch.no_grad():
        if wanted:
            forward_loop(root)
    results = {}
    for name, row in rows.items():
        inputs = captured.pop(name, None)  # freed layer by layer
        if inputs is not None and not inputs:
            raise InputError(f"the calibration inputs never ran layer {name!r}: it cannot be calibrated")
        act_rows = pick(torch.cat(inputs)) if inputs else None
        results[name] = calibrate_and_swap(root, name, row, act_rows, backend, methods[name])
    return results


def method_of(row: LayerConfig, default: str) -> str:
    """A resolved plan row's calibration: its rule's ``calibration`` field, else ``default``."""
    method = row.calibration or default
    if method not in METHODS:
        raise InputError(f"unknown calibration {method!r}; use one of {', '.join(METHODS)}")
    return method


def _formats(row: LayerConfig) -> tuple[FormatSpec | None, FormatSpec | None]:
    weight = get_format(row.weight) if row.weight is not None else None
    activation = get_format(row.activation) if row.activation is not None else None
    return weight, activation


def calibrate_expert(expert_module: torch.nn.Module, expert: str, table: list[LayerConfig], probe,
                     family: ModelFamily, *,
                     method: str = "mse", max_rows: int = 4096, backend: str = "auto",
                     device: torch.device | None = None, pooled: tuple[str, ...] = (),
                     progress: Callable[[str, int, int], None] | None = None) -> dict[str, LayerCalibration]:
    """Quantize one expert in place according to ``table`` (the plan's resolved rows), calibrated.

    Args:
        probe: an open ``ProbeFile`` holding this expert's captured inputs (``samples`` and, for the
            blocks, the first block's inputs); may be None when no layer is calibrated.
        family: the model's family: its block list and how a block is called.
        method: the default of :data:`CALIBRATIONS` (``none``, ``mse``, ``gptq``); a row's own
            ``calibration`` (from its plan rule) wins.
        max_rows: cap on the captured rows per layer used to calibrate it.
        device: where the blocks run (default: where the expert's parameters are; pass it when the expert
            is group-offloaded, so that the replayed inputs go to the execution device).
        pooled: other experts whose captured inputs are pooled with this expert's (a calibration set drawn
            from the whole trajectory, every expert's steps, instead of the expert's own steps).

    Returns:
        The calibration of every quantized layer.
    """
    rows = {r.layer: r for r in table if r.expert == expert and r.quantized}
    methods = {name: method_of(row, method) for name, row in rows.items()}
    if not any(map(needs_data, methods.values())):
        return calibrate_on_loop(expert_module, rows, methods, None, backend, pick=lambda act_rows: act_rows)
    results: dict[str, LayerCalibration] = {}
    sources = (expert, *[e for e in pooled if e != expert])
    for source in sources:
        if probe is None or source not in probe.experts:
            raise InputError(f"the probe file has no captured inputs for the {source!r} expert; probe it first")
    generator = torch.Generator().manual_seed(0)
    outside = [name for name in rows if family.block_of(name) is None]
    for name in outside:
        act_rows = None
        if needs_data(methods[name]):
            samples = [probe.read(source, name, "samples") for source in sources]
            act_rows = torch.cat([torch.from_numpy(a.reshape(-1, a.shape[-1])) for a in samples])
            # one expert: its first rows (the probe's sample is already spread); pooled: a draw over every expert's
            act_rows = act_rows[:max_rows] if len(sources) == 1 else _draw(act_rows, max_rows, generator)
        results[name] = calibrate_and_swap(expert_module, name, rows[name], act_rows, backend, methods[name])
    if len(outside) < len(rows):
        _calibrate_blocks(expert_module, expert, rows, methods, probe, family, max_rows, backend, results, progress,
                          device, sources)
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


def _calibrate_blocks(expert_module, expert, rows, methods, probe, family, max_rows, backend, results, progress,
                      device=None, sources=None):
    calls = [call for source in (sources or (expert,)) for call in _block_inputs(probe, source, family)]
    dtype = next(expert_module.parameters()).dtype
    device = device or next(expert_module.parameters()).device
    hidden = [c["hidden_states"] for c in calls]
    blocks = family.block_list(expert_module)
    generator = torch.Generator().manual_seed(0)
    for index, block in enumerate(blocks):
        names = [name for name in rows if family.block_of(name) == f"{family.blocks}.{index}"]

        def replay(_root, block=block, hidden=hidden):  # its recorded inputs, the blocks before it quantized
            for h, call in zip(hidden, calls, strict=True):
                _run_block(family, block, h, call, dtype, device)

        results.update(calibrate_on_loop(expert_module, {name: rows[name] for name in names}, methods, replay,
                                         backend, lambda act_rows: _draw(act_rows, max_rows, generator)))
        with torch.no_grad():  # the quantized block's outputs feed the next block
            hidden = [_run_block(family, block, h, call, dtype, device).cpu()
                      for h, call in zip(hidden, calls, strict=True)]
        if progress is not None:
            progress(expert, index + 1, len(blocks))


def _draw(rows: torch.Tensor, max_rows: int, generator: torch.Generator) -> torch.Tensor:
    """At most ``max_rows`` of ``rows``, drawn at random (seeded ``generator``), in their original order."""
    if rows.shape[0] <= max_rows:
        return rows
    return rows[torch.randperm(rows.shape[0], generator=generator)[:max_rows].sort().values]


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
            "methods": dict(Counter(calib.method for calib in layers.values())),
            "clipped_weights": sum(c.weight_clip < 1 for c in layers.values()),
            "clipped_activations": sum(c.act_clip < 1 for c in layers.values()),
            "mean_weight_nmse": float(np.mean(weights)) if weights else None,
            "mean_act_nmse": float(np.mean(acts)) if acts else None,
        }
    return out
