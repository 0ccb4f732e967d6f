"""``quantize_(module, plan, forward_loop=...)``: a plan applied to any ``nn.Module``, as torchao's ``quantize_``
and ModelOpt's ``mtq.quantize(model, config, forward_loop)`` are.

The module is one expert (or any model whose GEMMs are ``nn.Linear`` / patch ``Conv3d``); the plan's rules
name its layers under ``expert`` (``main:blocks.0.attn1.to_q``, ``re:main:.*``). Calibration that needs data
runs ``forward_loop(module)`` once, in full precision, capturing each planned layer's input rows, then
calibrates every layer on them (clip factors, GPTQ codes: any registered method). This is the calibration
set of one pass over the unquantized module; ``sensq apply-plan`` does better for a diffusion transformer
(block by block on the probe's real trajectory, each block's inputs carrying the quantization error of the
blocks before it), and is what sensq measures.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sensq.models.layers import layer_infos
from sensq.plan import LayerConfig, Plan, validate_plan
from sensq.quant.calibrate import LayerCalibration, calibrate_on_loop, method_of


def quantize_(module: torch.nn.Module, plan: Plan, *, expert: str = "main", calibrate: str = "none",
              forward_loop: Callable[[torch.nn.Module], None] | None = None, backend: str = "auto",
              max_rows: int = 4096) -> tuple[list[LayerConfig], dict[str, LayerCalibration]]:
    """Quantize ``module`` in place by ``plan`` (its layers named under ``expert``), calibrated on the inputs
    ``forward_loop`` feeds it when the method (``calibrate``, or a rule's own) needs data.

    Returns:
        The resolved table and each quantized layer's calibration.

    Raises:
        InputError: a rule that matches no layer, a layer no rule decides, a method that needs data without a
            ``forward_loop``, a layer the loop never ran.
    """
    table = validate_plan(plan, layer_infos({expert: module}))
    rows = {r.layer: r for r in table if r.quantized}
    methods = {name: method_of(row, calibrate) for name, row in rows.items()}
    calibrations = calibrate_on_loop(module, rows, methods, forward_loop, backend,
                                     lambda act_rows: act_rows[:max_rows])
    return table, calibrations
