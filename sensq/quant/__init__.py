"""Quantized layers and the swap that puts them into a model."""

import torch

from sensq.quant.layers import (
    QuantLinear,
    QuantPatchConv3d,
    is_quantized,
    original_module,
    quantize_module,
    swap,
)


def quantize_(model, plan, backend: str = "auto", **options):
    """Apply a plan in place. ``model`` is a :class:`sensq.models.LoadedModel` (every expert of the pipeline;
    :mod:`sensq.quant.apply`; returns the resolved table) or any ``nn.Module`` (one expert, its layers named
    under ``expert=``, calibrated through ``forward_loop=`` when ``calibrate=`` needs data;
    :mod:`sensq.quant.module`; returns the table and the calibrations)."""
    if isinstance(model, torch.nn.Module):
        from sensq.quant.module import quantize_ as quantize_module_

        return quantize_module_(model, plan, backend=backend, **options)
    from sensq.quant.apply import quantize_ as apply

    return apply(model, plan, backend)


def dequantize_(model) -> None:
    """Undo :func:`quantize_` exactly."""
    from sensq.quant.apply import dequantize_ as undo

    undo(model)


__all__ = ["QuantLinear", "QuantPatchConv3d", "dequantize_", "is_quantized", "original_module", "quantize_",
           "quantize_module", "swap"]
