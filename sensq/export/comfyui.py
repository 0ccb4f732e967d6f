"""ComfyUI's native per-layer quantized safetensors (``comfy_quant``), as comfy-kitchen defines the layouts.

A quantized Linear ``K`` holds ``K.weight`` (storage dtype), its scales and ``K.comfy_quant``, a uint8 tensor
of the JSON ``{"format": ...}``; a layer without ``comfy_quant`` is loaded as it is (sensq's high-precision
layers, in the dtype sensq ran them in).

* ``nvfp4_ts`` -> ``nvfp4``: ``weight`` uint8 ``[N, K/2]`` with the *even* element in the high nibble
  (sensq packs it in the low one), ``weight_scale`` the E4M3 block scales in cuBLAS's swizzled tile layout
  (128 x 4 tiles, padded), ``weight_scale_2`` the FP32 per-tensor scale: sensq's codes and scales unchanged,
  so comfy-kitchen's dequantizer gives sensq's weight bit for bit in FP32 (tests/export; in BF16 it
  multiplies the two scales in BF16 first, a rounding of its own). A block whose scale underflows to 0 is
  stored as sensq deployed it (scale 0: zeros), not clamped.
* ``int8`` per output channel -> ``int8_tensorwise`` with a per-row FP32 ``weight_scale`` ``[N, 1]``.
* ``fp8_e4m3_tensor`` -> ``float8_e4m3fn``: E4M3 codes and the scalar FP32 ``weight_scale``.
* ``mxfp8`` -> ``mxfp8``: E4M3 codes as ``weight``, the E8M0 scale bytes swizzled like NVFP4's as
  ``weight_scale`` (the layout of the Wan2.2 MXFP8 files ComfyUI users share).
* ``int4@G`` -> ``awq_w4a16`` (group ``G``, zero points 0; weight-only: ComfyUI runs its activations in high
  precision). The scale is stored in the weight's dtype: FP32 keeps it, BF16 rounds it (the NMSE is reported).
* Other formats are refused, naming ``nvfp4_ts`` (4-bit) or ``int8`` (8-bit): ComfyUI has no HiF4 or MXFP4
  layout, and its FP8 layout has one scale per tensor where sensq's ``fp8_e4m3`` has one per row (plan
  ``fp8_e4m3_tensor`` for it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sensq.errors import InputError
from sensq.export.target import Layer, Target, Written, nearest_format, nmse, register_target
from sensq.formats.packing import element_codes
from sensq.formats.spec import Family
from sensq.store.files import atomic_write_bytes


def swizzle(scales: torch.Tensor) -> torch.Tensor:
    """``[rows, blocks]`` -> cuBLAS's block-scale layout (128-row x 4-column tiles, each stored as 32 x 16, the
    matrix zero-padded to whole tiles): what comfy-kitchen's ``from_blocked`` undoes."""
    rows, cols = scales.shape
    padded_rows, padded_cols = -(-rows // 128) * 128, -(-cols // 4) * 4
    padded = torch.zeros(padded_rows, padded_cols, dtype=scales.dtype)
    padded[:rows, :cols] = scales
    tiles = padded.reshape(padded_rows // 128, 128, padded_cols // 4, 4).permute(0, 2, 1, 3)
    tiles = tiles.reshape(-1, 4, 32, 4).transpose(1, 2)
    return tiles.reshape(padded_rows, padded_cols).contiguous()


def _quant_tag(fmt: str, **fields) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps({"format": fmt, **fields}).encode()), dtype=torch.uint8)


def _layer(layer: Layer) -> Written:
    packed, fmt = layer.packed, layer.packed.fmt
    if len(layer.shape) != 2:
        raise InputError(f"ComfyUI's quantized layouts are for Linear weights, not this "
                         f"{list(layer.shape)} one: keep it in high precision (sensq plan ... --protect "
                         f"'{layer.name}')")
    rows, columns = packed.shape
    key = layer.wan
    if fmt.family is Family.NVFP4 and fmt.tensor_scale_bits:
        if rows % 16 or columns % 16:
            raise InputError(f"ComfyUI's NVFP4 pads weights to multiples of 16; {rows}x{columns} is not one")
        codes = packed.data["codes"]
        hi_first = ((codes & 0xF) << 4) | (codes >> 4)
        scales = packed.data["scale"].view(torch.float8_e4m3fn)
        return Written({f"{key}.weight": hi_first.contiguous(), f"{key}.weight_scale": swizzle(scales),
                        f"{key}.weight_scale_2": packed.data["tensor_scale"].float().reshape(()),
                        f"{key}.comfy_quant": _quant_tag("nvfp4")}, "nvfp4", True, 0.0)
    if fmt.family is Family.INT and fmt.element_bits == 8 and fmt.block_size is None:
        return Written({f"{key}.weight": packed.data["codes"].view(torch.int8).contiguous(),
                        f"{key}.weight_scale": packed.data["scale"].float().reshape(rows, 1).contiguous(),
                        f"{key}.comfy_quant": _quant_tag("int8_tensorwise")}, "int8_tensorwise", True, 0.0)
    if fmt.family is Family.FP8 and fmt.tensor_scale_bits:
        return Written({f"{key}.weight": packed.data["codes"].view(torch.float8_e4m3fn).reshape(rows, columns),
                        f"{key}.weight_scale": packed.data["scale"].float().reshape(()),
                        f"{key}.comfy_quant": _quant_tag("float8_e4m3fn")}, "float8_e4m3fn", True, 0.0)
    if fmt.family is Family.MXFP8:
        if columns % 32:
            raise InputError(f"ComfyUI's MXFP8 needs whole blocks of 32 input features; this layer has {columns}")
        return Written({f"{key}.weight": packed.data["codes"].view(torch.float8_e4m3fn).contiguous(),
                        f"{key}.weight_scale": swizzle(packed.data["scale"]),
                        f"{key}.comfy_quant": _quant_tag("mxfp8")}, "mxfp8", True, 0.0)
    if fmt.family is Family.INT and fmt.element_bits == 4 and fmt.block_size and columns % fmt.block_size == 0:
        return _awq(layer)
    raise nearest_format(fmt, "nvfp4_ts", "fp8_e4m3_tensor", "ComfyUI")


def _awq(layer: Layer) -> Written:
    """sensq's symmetric ``int4@G`` as ``awq_w4a16``: the unsigned code ``q + 8`` (low nibble = even element, as
    sensq packs), the group scale transposed to ``[K/G, N]`` in the weight's dtype and zero points 0, so
    ``(q + 8 - 8) s + 0`` is sensq's ``q s`` (weight-only in ComfyUI: activations stay in high precision)."""
    packed = layer.packed
    rows, columns = packed.shape
    group = packed.fmt.block_size
    signed = element_codes(packed)[:, :columns].view(torch.int8).to(torch.int16)
    unsigned = (signed + 8).to(torch.uint8)
    qdata = (unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)).contiguous()
    dtype = layer.weight.dtype
    scale = packed.data["scale"].to(dtype).t().contiguous()
    exact = torch.equal(scale.float().t(), packed.data["scale"].float())
    weight = ((unsigned.to(dtype) - 8.0).view(rows, columns // group, group) * scale.t().unsqueeze(-1)).view(rows, -1)
    error = nmse(weight, layer.weight)
    return Written({f"{layer.wan}.weight": qdata, f"{layer.wan}.weight_scale": scale,
                    f"{layer.wan}.weight_zeros": torch.zeros_like(scale),
                    f"{layer.wan}.comfy_quant": _quant_tag("awq_w4a16", group_size=group)}, "awq_w4a16", True,
                   error, "" if exact else f"codes kept; the FP32 group scale rounded to {dtype}")


def _write(path: Path, tensors: dict, family: str) -> None:
    from safetensors.torch import save

    contiguous = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    atomic_write_bytes(path, save(contiguous, metadata={"sensq.family": family}))


TARGET = register_target(Target("comfyui", ".safetensors", "ComfyUI native (comfy_quant): nvfp4 from nvfp4_ts, "
                                "int8_tensorwise from int8, float8_e4m3fn from fp8_e4m3_tensor, mxfp8, awq_w4a16 "
                                "from int4@G", _layer, _write))
