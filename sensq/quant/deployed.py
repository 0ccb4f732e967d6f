"""Deployed quantized layers: only the packed weight is resident, decoded on every forward.

The simulation layers (:mod:`sensq.quant.layers`) keep the full-precision weight and a dequantized copy
so that sweeps can swap formats and undo them; a deployment cannot afford that (an A14B expert would
need about twice its bf16 size). A :class:`PackedLinear` holds the weight in its format's bit layout
(HiF4: the spec's 36-byte blocks, 4.5 bits per weight; E2M1 and INT formats: codes + scales) plus the
bias, and nothing else per layer:

* on CUDA, HiF4 weights with HiF4 activations run the fused Triton W4A4 kernel, which reads the packed
  blocks directly;
* everywhere else the weight is decoded into a scratch buffer shared by all deployed layers of a thread
  (one buffer of the largest layer's size, reused forward after forward) and the activation is
  fake-quantized as in the simulation. HiF4 on the CPU decodes with a numba kernel.

Outputs are bit-identical to the simulation layer on the same inputs (tested): the decoded weight is
``unpack(pack(clip(W)))``, which equals the simulation's ``weight_q``, and the rest of the forward is the
same code. Deployed layers are for inference: with autograd recording, the weight is decoded into a
fresh tensor instead of the shared scratch (a backward pass must not see the next layer's weight).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from sensq.formats import Family, FormatSpec, PackedTensor, get_format
from sensq.formats.backend import Backend, available, kernel
from sensq.formats.packing import unpack_into
from sensq.quant.layers import (
    QuantLinear,
    QuantPatchConv3d,
    clip_rows,
    fake_quantize,
    packed_weight,
    patches_to_rows,
    rotate,
    rows_to_patches,
)

_DATA_PREFIX = "packed_"


class _Scratch(threading.local):
    """One reusable decode buffer per thread, device and dtype, grown to the largest layer seen."""

    def __init__(self):
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (device, dtype)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self.buffers.pop(key, None)  # free the smaller one first
            buffer = self.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]


SCRATCH = _Scratch()


def scratch_bytes() -> int:
    """Bytes held by this thread's decode scratch buffers."""
    return sum(b.numel() * b.element_size() for b in SCRATCH.buffers.values())


def release_scratch() -> None:
    """Free this thread's decode scratch (it is allocated again on the next forward)."""
    SCRATCH.buffers.clear()


class _PackedWeight(torch.nn.Module):
    """Shared by both deployed layers: the packed weight as buffers and its decode."""

    weight_format: FormatSpec
    act_format: FormatSpec | None

    def _init_packed(self, packed: PackedTensor, bias, act_format, act_clip: float, weight_clip: float,
                     backend: str) -> None:
        self.weight_format = packed.fmt
        self.act_format = None if act_format is None else get_format(act_format)
        self.act_clip, self.weight_clip, self.backend = float(act_clip), float(weight_clip), backend
        self.weight_shape, self.weight_dtype = tuple(packed.shape), packed.dtype
        self._fields = {}
        for field, tensor in packed.data.items():
            # every field as raw bytes: .to(dtype) on the model must not convert an FP32 scale to bf16
            self._fields[field] = (tensor.dtype, tuple(tensor.shape))
            self.register_buffer(_DATA_PREFIX + field, tensor.contiguous().reshape(-1).view(torch.uint8))
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    def packed(self) -> PackedTensor:
        data = {field: getattr(self, _DATA_PREFIX + field).view(dtype).reshape(shape)
                for field, (dtype, shape) in self._fields.items()}
        return PackedTensor(self.weight_format, self.weight_shape, len(self.weight_shape) - 1, self.weight_dtype,
                            data)

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed weight (every buffer this layer holds for it)."""
        return sum(getattr(self, _DATA_PREFIX + field).numel() for field in self._fields)

    def decoded_weight(self) -> torch.Tensor:
        """The dequantized weight ``[out, in]`` (in the scratch, or fresh under autograd)."""
        device = getattr(self, _DATA_PREFIX + next(iter(self._fields))).device
        numel = self.weight_shape[0] * self.weight_shape[1]
        if torch.is_grad_enabled():
            out = torch.empty(numel, dtype=self.weight_dtype, device=device)
        else:
            out = SCRATCH.get(numel, self.weight_dtype, device)
        return unpack_into(self.packed(), out)


class PackedLinear(_PackedWeight):
    """A deployed ``nn.Linear``: ``F.linear(Q_act(x R), decode(packed W R), b)`` (``R``: the rotation, when the
    layer has one)."""

    sensq_layer_kind = "linear"  # sensq.models.layers: a quantizable layer, as the nn.Linear it replaces

    @classmethod
    def from_packed(cls, packed: PackedTensor, bias: torch.Tensor | None, act_format, *, act_clip: float = 1.0,
                    weight_clip: float = 1.0, backend: str = "auto", rotation: int | None = None) -> PackedLinear:
        if len(packed.shape) != 2 or packed.dim != 1:
            raise ValueError(f"a packed Linear weight is [out, in] packed along in; got {list(packed.shape)} "
                             f"along dim {packed.dim}")
        layer = cls()
        layer.out_features, layer.in_features = packed.shape
        if rotation is not None and layer.in_features % rotation:
            raise ValueError(f"a rotation in blocks of {rotation} does not fit {layer.in_features} input features")
        layer.rotation = rotation
        layer._init_packed(packed, bias, act_format, act_clip, weight_clip, backend)
        return layer

    @classmethod
    def from_quant(cls, quant: QuantLinear) -> PackedLinear:
        """The deployed form of a simulation layer (same formats, clipping, rotation and backend)."""
        return cls.from_packed(packed_weight(quant), quant.bias, quant.act_format, act_clip=quant.act_clip,
                               weight_clip=quant.weight_clip, backend=quant.backend, rotation=quant.rotation)

    def _fused(self, x: torch.Tensor) -> bool:
        """HiF4 W4A4 runs the fused kernel: with backend 'triton' (as the simulation layer does), and with
        'auto' on a CUDA GPU where triton is installed."""
        if self.weight_format.name != "hif4" or self.act_format is None or self.act_format.name != "hif4":
            return False
        if self.backend == "triton":
            return True
        return self.backend == "auto" and x.device.type == "cuda" and available(Backend.TRITON, "cuda")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rotate(x, self.rotation)
        if self._fused(x):
            hif4_linear = kernel(Backend.TRITON, Family.HIF4, "linear")
            return hif4_linear(clip_rows(x, self.act_clip), self.packed().data["blocks"], self.bias, self.out_features)
        x = fake_quantize(x, self.act_format, self.act_clip, self.backend)
        return F.linear(x, self.decoded_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        act = self.act_format.identity if self.act_format else None
        rotation = f", Hadamard rotation {self.rotation}" if self.rotation else ""
        return (f"{self.in_features}, {self.out_features}, weight={self.weight_format.identity} packed "
                f"({self.packed_bytes} bytes), act={act} (clip {self.act_clip:g}){rotation}")


class PackedPatchConv3d(_PackedWeight):
    """The deployed patch-embedding Conv3d (stride = kernel): packed weight over flattened patches."""

    sensq_layer_kind = "conv3d"

    @classmethod
    def from_packed(cls, packed: PackedTensor, bias: torch.Tensor | None, act_format, *, conv_shape,
                    kernel_size, act_clip: float = 1.0, weight_clip: float = 1.0,
                    backend: str = "auto") -> PackedPatchConv3d:
        layer = cls()
        layer.conv_shape = tuple(conv_shape)
        layer.kernel_size = layer.stride = tuple(kernel_size)
        layer._init_packed(packed, bias, act_format, act_clip, weight_clip, backend)
        return layer

    @classmethod
    def from_quant(cls, quant: QuantPatchConv3d) -> PackedPatchConv3d:
        return cls.from_packed(packed_weight(quant), quant.bias, quant.act_format, conv_shape=quant.weight.shape,
                               kernel_size=quant.kernel_size, act_clip=quant.act_clip,
                               weight_clip=quant.weight_clip, backend=quant.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_format is not None:
            rows = fake_quantize(patches_to_rows(self, x), self.act_format, self.act_clip, self.backend)
            x = rows_to_patches(self, rows, x.shape)
        weight = self.decoded_weight().reshape(self.conv_shape)
        return F.conv3d(x, weight.to(x.dtype), self.bias, self.stride)


def is_deployed(module: torch.nn.Module) -> bool:
    return isinstance(module, _PackedWeight)


def deploy_module(module: torch.nn.Module) -> torch.nn.Module:
    """The deployed twin of a weight-quantized simulation layer; other modules come back as they are
    (a layer whose weight stays in high precision keeps its simulation form: nothing to pack)."""
    if isinstance(module, QuantLinear) and module.weight_format is not None:
        return PackedLinear.from_quant(module)
    if isinstance(module, QuantPatchConv3d) and module.weight_format is not None:
        return PackedPatchConv3d.from_quant(module)
    return module


def deploy_(root: torch.nn.Module) -> int:
    """Replace every weight-quantized simulation layer under ``root`` by its deployed form, in place
    (irreversible: the full-precision weight is dropped). Returns the number of layers replaced."""
    from sensq.quant.layers import swap

    count = 0
    for name, module in list(root.named_modules()):
        deployed = deploy_module(module)
        if deployed is not module:
            swap(root, name, deployed)
            count += 1
    return count
