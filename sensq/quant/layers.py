"""Fake-quantized layers (W4A4 simulation), made by a reversible swap.

``QuantLinear`` *is* an ``nn.Linear`` that shares the original's ``weight`` and ``bias``
parameters (same tensors, same state-dict keys), so the model stays a plain diffusers model:
``save_pretrained`` writes the full-precision weights, hooks and offloading see a Linear, and
``to_linear()`` returns a plain ``nn.Linear`` holding the very same parameters (bit-identical).
Weights are quantized per output channel and activations per token, both in blocks along
``in_features`` (the HiF4 QLinear convention, spec §2.5). The patch-embedding ``Conv3d``
(stride = kernel) is a GEMM over non-overlapping patches and gets the same treatment.

Calibration: an optional clipping factor ``c`` in (0, 1] per operand; the operand is clamped to
``c`` times its absmax (per output channel for weights, per token for activations) before it is
quantized, so block scales come from the clipped range. ``c = 1`` is the format's own rule. Or the
weight's codes were chosen by a calibration (GPTQ, :mod:`sensq.quant.gptq`): the layer then holds that
packed weight (``weight_packed``) and its ``weight_q`` is the packed weight decoded, never re-encoded.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from sensq.formats import Family, FormatSpec, PackedTensor, get_format, pack, quantize_dequantize, unpack
from sensq.formats.backend import Backend, kernel
from sensq.models.layers import patches_to_rows


def _format(fmt: str | FormatSpec | None) -> FormatSpec | None:
    return None if fmt is None else get_format(fmt)


def _is_hif4(fmt: FormatSpec | None) -> bool:
    return fmt is not None and fmt.name == "hif4"


def gemm_weight(module: torch.nn.Module) -> torch.Tensor:
    """The layer's weight as the float32 ``[out, in]`` matrix of its GEMM (Conv3d: flattened patches)."""
    weight = module.weight.detach()
    return weight.reshape(weight.shape[0], -1).float()


def clip_rows(x: torch.Tensor, clip: float) -> torch.Tensor:
    """Clamp every row (last dim) of ``x`` to ``clip`` times its absmax; the identity for ``clip == 1``."""
    if clip == 1.0:
        return x
    bound = x.abs().amax(dim=-1, keepdim=True) * clip
    return torch.minimum(torch.maximum(x, -bound), bound)


ROTATION_BLOCK = 64
"""Size of the block-diagonal Hadamard rotation (``calibration: rotate``): HiF4's block, a multiple of MXFP4's
32 and NVFP4's 16, so a rotation never mixes values across two scale blocks of those formats."""


@functools.lru_cache(maxsize=8)
def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of size ``n`` (a power of two), float32 on the CPU; symmetric.
    Built once per size (every forward of a rotated layer uses it): callers must not modify it."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / n**0.5


def rotate(x: torch.Tensor, block: int | None) -> torch.Tensor:
    """``x`` times the block-diagonal Hadamard rotation along its last dim (float32 math, ``x``'s dtype back);
    the identity for ``block`` None. Orthogonal and symmetric: ``(x R)(W R)^T = x W^T``."""
    if block is None:
        return x
    shape = x.shape
    if shape[-1] % block:
        raise ValueError(f"a rotation in blocks of {block} needs a width that is a multiple of it, got {shape[-1]}")
    h = hadamard(block).to(x.device)
    return (x.float().reshape(*shape[:-1], shape[-1] // block, block) @ h).reshape(shape).to(x.dtype)


def fake_quantize(x: torch.Tensor, fmt: FormatSpec | None, clip: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """``Q(clip_rows(x))`` along the last dim (``x`` itself when ``fmt`` is None)."""
    if fmt is None:
        return x
    return quantize_dequantize(clip_rows(x, clip), fmt, dim=-1, backend=backend)


class QuantLinear(torch.nn.Linear):
    """``F.linear(Q_act(x R), Q_w(W R), b)``; ``None`` formats leave that operand as it is; ``R`` is the
    block-diagonal Hadamard rotation when ``rotation`` is set (the identity otherwise)."""

    weight_format: FormatSpec | None
    act_format: FormatSpec | None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, weight_format, act_format, *, weight_clip: float = 1.0,
                    act_clip: float = 1.0, backend: str = "auto", weight_q: torch.Tensor | None = None,
                    weight_packed: PackedTensor | None = None, rotation: int | None = None) -> QuantLinear:
        """Wrap ``linear`` (its parameters are shared, not copied).

        ``weight_q`` supplies the already-quantized weight (e.g. unpacked from a checkpoint) instead of
        quantizing ``linear.weight`` (HiF4 is not idempotent: never re-quantize a quantized weight);
        ``weight_packed`` supplies it packed (codes a calibration chose), and is what a checkpoint stores.
        ``rotation``: both operands are rotated (block-diagonal Hadamard of that size) before they are
        quantized; ``weight_q``/``weight_packed`` are then of the rotated weight.
        """
        quant = cls.__new__(cls)
        torch.nn.Module.__init__(quant)
        quant.in_features, quant.out_features = linear.in_features, linear.out_features
        quant.weight = linear.weight
        quant.bias = linear.bias
        quant.weight_format = _format(weight_format)
        quant.act_format = _format(act_format)
        quant.weight_clip, quant.act_clip, quant.backend = float(weight_clip), float(act_clip), backend
        quant.rotation = rotation
        quant.weight_packed = _chosen(weight_packed, quant.weight_format, linear.weight)
        if weight_q is None and weight_packed is not None:
            weight_q = unpack(weight_packed).to(linear.weight.device)
        if weight_q is None:
            weight_q = fake_quantize(rotate(linear.weight.detach(), rotation), quant.weight_format,
                                     quant.weight_clip, backend)
        quant.register_buffer("weight_q", weight_q, persistent=False)
        # the fused kernel packs the weight itself: only for plain weights the format's own rule rounds
        quant.fused = (backend == "triton" and weight_packed is None and rotation is None
                       and _is_hif4(quant.weight_format) and _is_hif4(quant.act_format))
        if quant.fused:
            # the fused W4A4 kernel reads the weight packed (spec §6) and quantizes activations on the fly;
            # buffers, so that .to(device) moves them with the layer
            pack_blocks = kernel(Backend.TRITON, Family.HIF4, "pack")
            blocks = pack_blocks(clip_rows(linear.weight.detach(), quant.weight_clip), dim=1)
            quant.register_buffer("packed_blocks", blocks, persistent=False)
        return quant

    def to_linear(self) -> torch.nn.Linear:
        linear = torch.nn.Linear.__new__(torch.nn.Linear)
        torch.nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            hif4_linear = kernel(Backend.TRITON, Family.HIF4, "linear")
            return hif4_linear(clip_rows(x, self.act_clip), self.packed_blocks, self.bias, self.out_features)
        x = fake_quantize(rotate(x, self.rotation), self.act_format, self.act_clip, self.backend)
        return F.linear(x, self.weight_q.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        w = self.weight_format.identity if self.weight_format else None
        a = self.act_format.identity if self.act_format else None
        rotation = f", Hadamard rotation {self.rotation}" if self.rotation else ""
        return (f"{self.in_features}, {self.out_features}, weight={w} (clip {self.weight_clip:g}), "
                f"act={a} (clip {self.act_clip:g}){rotation}")


def rows_to_patches(conv: torch.nn.Conv3d, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`patches_to_rows` for an input of ``shape``."""
    kt, kh, kw = conv.kernel_size
    b, c, f, h, w = shape
    patches = rows.reshape(b, f // kt, h // kh, w // kw, c, kt, kh, kw)
    return patches.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(shape)


class QuantPatchConv3d(torch.nn.Conv3d):
    """The patch-embedding Conv3d (stride = kernel) with weights and patch inputs fake-quantized."""

    weight_format: FormatSpec | None
    act_format: FormatSpec | None

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv3d, weight_format, act_format, *, weight_clip: float = 1.0,
                  act_clip: float = 1.0, backend: str = "auto", weight_q: torch.Tensor | None = None,
                  weight_packed: PackedTensor | None = None) -> QuantPatchConv3d:
        if tuple(conv.stride) != tuple(conv.kernel_size) or any(conv.padding):
            raise ValueError("QuantPatchConv3d needs stride == kernel_size and no padding (a patch embedding)")
        quant = cls.__new__(cls)
        torch.nn.Module.__init__(quant)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
            setattr(quant, attr, getattr(conv, attr))
        quant.weight, quant.bias = conv.weight, conv.bias
        quant.weight_format, quant.act_format = _format(weight_format), _format(act_format)
        quant.weight_clip, quant.act_clip, quant.backend = float(weight_clip), float(act_clip), backend
        quant.rotation = None  # the patch embedding is not rotated
        quant.weight_packed = _chosen(weight_packed, quant.weight_format, conv.weight)
        if weight_q is None and weight_packed is not None:
            weight_q = unpack(weight_packed).reshape(conv.weight.shape).to(conv.weight.device)
        if weight_q is None:
            flat = conv.weight.detach().reshape(conv.weight.shape[0], -1)
            weight_q = fake_quantize(flat, quant.weight_format, quant.weight_clip, backend).reshape(conv.weight.shape)
        quant.register_buffer("weight_q", weight_q, persistent=False)
        return quant

    def to_conv(self) -> torch.nn.Conv3d:
        conv = torch.nn.Conv3d.__new__(torch.nn.Conv3d)
        torch.nn.Module.__init__(conv)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
            setattr(conv, attr, getattr(self, attr))
        conv.weight, conv.bias = self.weight, self.bias
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_format is not None:
            rows = fake_quantize(patches_to_rows(self, x), self.act_format, self.act_clip, self.backend)
            x = rows_to_patches(self, rows, x.shape)
        return F.conv3d(x, self.weight_q.to(x.dtype), self.bias, self.stride)


def _chosen(packed: PackedTensor | None, fmt: FormatSpec | None, weight: torch.Tensor) -> PackedTensor | None:
    """``packed`` after checking it is this weight's format and GEMM shape (``[out, in]`` along in)."""
    if packed is None:
        return None
    gemm = (weight.shape[0], weight[0].numel())
    if fmt is None or packed.fmt.identity != fmt.identity or tuple(packed.shape) != gemm or packed.dim != 1:
        raise ValueError(f"a packed weight {packed.fmt.identity} {list(packed.shape)} does not fit a "
                         f"{fmt.identity if fmt else 'high-precision'} weight {list(gemm)}")
    return packed


def packed_weight(layer: torch.nn.Module) -> PackedTensor:
    """What a quantized layer's weight is stored as: the packed weight a calibration chose, else the
    (clipped) GEMM weight packed by the format's own rule. Decodes to the layer's ``weight_q``."""
    if layer.weight_packed is not None:
        return layer.weight_packed
    flat = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    return pack(clip_rows(rotate(flat, layer.rotation), layer.weight_clip), layer.weight_format)


def quantize_module(module: torch.nn.Module, weight_format, act_format, backend: str = "auto", *,
                    weight_clip: float = 1.0, act_clip: float = 1.0,
                    weight_q: torch.Tensor | None = None, weight_packed: PackedTensor | None = None,
                    rotation: int | None = None) -> torch.nn.Module:
    """The fake-quantized twin of a Linear or patch Conv3d (parameters shared); ``rotation`` for Linears only."""
    module = original_module(module)
    kwargs = {"weight_clip": weight_clip, "act_clip": act_clip, "backend": backend, "weight_q": weight_q,
              "weight_packed": weight_packed}
    if isinstance(module, torch.nn.Linear):
        return QuantLinear.from_linear(module, weight_format, act_format, rotation=rotation, **kwargs)
    if rotation is not None:
        raise ValueError("only Linear layers can be rotated (the patch embedding cannot)")
    if isinstance(module, torch.nn.Conv3d):
        return QuantPatchConv3d.from_conv(module, weight_format, act_format, **kwargs)
    raise TypeError(f"cannot quantize a {type(module).__name__}; sensq quantizes nn.Linear and the patch Conv3d")


def is_quantized(module: torch.nn.Module) -> bool:
    return isinstance(module, (QuantLinear, QuantPatchConv3d))


def original_module(module: torch.nn.Module) -> torch.nn.Module:
    """The plain layer behind a quantized twin (same parameters); the identity on other modules."""
    if isinstance(module, QuantLinear):
        return module.to_linear()
    if isinstance(module, QuantPatchConv3d):
        return module.to_conv()
    return module


def swap(root: torch.nn.Module, name: str, new: torch.nn.Module) -> torch.nn.Module:
    """Replace submodule ``name`` of ``root`` by ``new``; returns the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
