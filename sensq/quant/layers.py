"""Fake-quantized layers (W4A4 simulation), made by a reversible swap.

``QuantLinear.from_linear(linear, weight_format, act_format)`` keeps the original ``nn.Linear``
inside; ``to_linear()`` returns it untouched (bit-identical weights, same object). Weights are
quantized per output channel and activations per token, both in blocks along ``in_features``
(the HiF4 QLinear convention, spec §2.5). The patch-embedding ``Conv3d`` (stride = kernel) is a
GEMM over non-overlapping patches and gets the same treatment through its im2col view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sensq.formats import FormatSpec, get_format, quantize_dequantize


def _format(fmt: str | FormatSpec | None) -> FormatSpec | None:
    return None if fmt is None else get_format(fmt)


class QuantLinear(torch.nn.Module):
    """``F.linear(Q_act(x), Q_w(W), b)``; ``None`` formats leave that operand as it is."""

    def __init__(self, linear: torch.nn.Linear, weight_format: str | FormatSpec | None,
                 act_format: str | FormatSpec | None, backend: str = "auto"):
        super().__init__()
        self.original = linear
        self.weight_format = _format(weight_format)
        self.act_format = _format(act_format)
        self.backend = backend
        weight = linear.weight.detach()
        if self.weight_format is not None:
            weight = quantize_dequantize(weight, self.weight_format, dim=-1, backend=backend)
        self.register_buffer("weight_q", weight, persistent=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, weight_format, act_format, backend: str = "auto") -> QuantLinear:
        return cls(linear, weight_format, act_format, backend)

    def to_linear(self) -> torch.nn.Linear:
        return self.original

    @property
    def bias(self):
        return self.original.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_format is not None:
            x = quantize_dequantize(x, self.act_format, dim=-1, backend=self.backend)
        return F.linear(x, self.weight_q, self.original.bias)

    def extra_repr(self) -> str:
        w = self.weight_format.name if self.weight_format else None
        a = self.act_format.name if self.act_format else None
        return f"{self.in_features}, {self.out_features}, weight={w}, act={a}"


def patches_to_rows(conv: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, C, F, H, W]`` -> ``[B*F'*H'*W', C*kt*kh*kw]`` (the patch vector in weight order)."""
    kt, kh, kw = conv.kernel_size
    b, c, f, h, w = x.shape
    patches = x.reshape(b, c, f // kt, kt, h // kh, kh, w // kw, kw)
    return patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(-1, c * kt * kh * kw)


def rows_to_patches(conv: torch.nn.Conv3d, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`patches_to_rows` for an input of ``shape``."""
    kt, kh, kw = conv.kernel_size
    b, c, f, h, w = shape
    patches = rows.reshape(b, f // kt, h // kh, w // kw, c, kt, kh, kw)
    return patches.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(shape)


class QuantPatchConv3d(torch.nn.Module):
    """The patch-embedding Conv3d (stride = kernel) with weights and patch inputs fake-quantized."""

    def __init__(self, conv: torch.nn.Conv3d, weight_format, act_format, backend: str = "auto"):
        super().__init__()
        if tuple(conv.stride) != tuple(conv.kernel_size) or any(conv.padding):
            raise ValueError("QuantPatchConv3d needs stride == kernel_size and no padding (a patch embedding)")
        self.original = conv
        self.weight_format = _format(weight_format)
        self.act_format = _format(act_format)
        self.backend = backend
        weight = conv.weight.detach()
        if self.weight_format is not None:
            flat = quantize_dequantize(weight.reshape(weight.shape[0], -1), self.weight_format, backend=backend)
            weight = flat.reshape(weight.shape)
        self.register_buffer("weight_q", weight, persistent=False)

    def to_conv(self) -> torch.nn.Conv3d:
        return self.original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_format is not None:
            rows = quantize_dequantize(patches_to_rows(self.original, x), self.act_format, backend=self.backend)
            x = rows_to_patches(self.original, rows, x.shape)
        return F.conv3d(x, self.weight_q, self.original.bias, self.original.stride)


def quantize_module(module: torch.nn.Module, weight_format, act_format, backend: str = "auto") -> torch.nn.Module:
    """The fake-quantized twin of a Linear or patch Conv3d."""
    if isinstance(module, torch.nn.Linear):
        return QuantLinear.from_linear(module, weight_format, act_format, backend)
    if isinstance(module, torch.nn.Conv3d):
        return QuantPatchConv3d(module, weight_format, act_format, backend)
    raise TypeError(f"cannot quantize a {type(module).__name__}; sensq quantizes nn.Linear and the patch Conv3d")


def original_module(module: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`quantize_module` (the identity on modules that are not quantized)."""
    return module.original if isinstance(module, (QuantLinear, QuantPatchConv3d)) else module


def swap(root: torch.nn.Module, name: str, new: torch.nn.Module) -> torch.nn.Module:
    """Replace submodule ``name`` of ``root`` by ``new``; returns the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
