"""Quantized layers and the swap that puts them into a model."""

from sensq.quant.layers import (
    QuantLinear,
    QuantPatchConv3d,
    is_quantized,
    original_module,
    quantize_module,
    swap,
)


def quantize_(model, plan, backend: str = "auto"):
    """Apply a plan to a loaded model in place (see :mod:`sensq.quant.apply`)."""
    from sensq.quant.apply import quantize_ as apply

    return apply(model, plan, backend)


def dequantize_(model) -> None:
    """Undo :func:`quantize_` exactly."""
    from sensq.quant.apply import dequantize_ as undo

    undo(model)


__all__ = ["QuantLinear", "QuantPatchConv3d", "dequantize_", "is_quantized", "original_module", "quantize_",
           "quantize_module", "swap"]
