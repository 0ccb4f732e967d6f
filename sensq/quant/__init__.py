"""Quantized layers and the swap that puts them into a model."""

from sensq.quant.layers import QuantLinear, QuantPatchConv3d, original_module, quantize_module, swap

__all__ = ["QuantLinear", "QuantPatchConv3d", "original_module", "quantize_module", "swap"]
