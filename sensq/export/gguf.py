"""GGUF as ComfyUI-GGUF reads it: ``general.architecture = wan``, one tensor type per tensor.

* ``int8@32`` -> Q8_0 (block 32: an FP16 scale ``d`` and 32 int8 codes, ``w = d q``) and ``int4@32`` -> Q4_0
  (block 32: ``d`` and 16 bytes of nibbles, element ``j`` in the low nibble of byte ``j`` and element ``j + 16``
  in its high nibble, ``w = d (q - 8)``): sensq's codes are kept (``q + 8`` for Q4_0) and its FP32 scale is
  rounded to FP16, so each such layer's NMSE against sensq's deployed weight is measured with gguf's own
  dequantizer and reported.
* Every other tensor keeps the dtype sensq ran it in (F32, F16 or BF16). The patch embedding's Conv3d weight
  (five dims; GGUF holds four) is stored flattened to two, with its shape in ``comfy.gguf.orig_shape.<key>``
  as ComfyUI-GGUF's own converter writes it, quantized or not.
* ``q4_k`` and ``q6_k`` (sensq's registered Q4_K and Q6_K, :mod:`sensq.formats.kquant`) -> Q4_K and Q6_K:
  codes, sub-block scales (and mins) and FP16 super-block scales as sensq deployed them (GPTQ's included);
  gguf's dequantizer gives sensq's weight bit for bit.
* Other quantized formats (HiF4, MXFP4, NVFP4, FP8, INT4/INT8 in other groups) are refused, naming
  ``q4_k`` or ``int8@32``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from sensq.errors import InputError
from sensq.export.target import Layer, Target, Written, nearest_format, nmse, register_target
from sensq.formats.packing import element_codes
from sensq.formats.spec import Family
from sensq.store.files import temporary_sibling

BLOCK = 32


def _int_codes(layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """sensq's INT codes ``[rows, K]`` (signed) and FP32 scales ``[rows, K / 32]`` of the layer."""
    packed = layer.packed
    codes = element_codes(packed)[:, : packed.shape[1]].view(torch.int8)
    return codes.to(torch.int16).numpy(), packed.data["scale"].float().numpy()


def _written(layer: Layer, raw: np.ndarray, kind, rerounded: str = "") -> Written:
    """The layer's GGUF blocks ``raw`` of type ``kind``, with sensq's codes kept, and their NMSE against sensq's
    deployed weight as gguf's own dequantizer reads them (``rerounded`` says why it may not be 0)."""
    import gguf

    target = torch.from_numpy(gguf.quants.dequantize(raw, kind).astype(np.float32)).reshape(layer.weight.shape)
    error = nmse(target, layer.weight.float())
    return Written({f"{layer.wan}.weight": (raw, kind, layer.shape)}, kind.name, True, error,
                   "" if error == 0 else rerounded)


def _q4_k(layer: Layer) -> Written:
    """sensq's ``q4_k`` as GGUF's Q4_K blocks (144 bytes per 256: d, dmin, the 12 bytes of 6-bit scales and
    mins, 128 bytes of nibbles, sub-block 2c in the low and 2c + 1 in the high nibbles of chunk c)."""
    import gguf

    packed = layer.packed
    rows, columns = packed.shape
    if columns % 256:
        raise InputError(f"GGUF's Q4_K holds rows of whole 256-element super-blocks; this layer has {columns}")
    q = element_codes(packed).reshape(rows, columns // 256, 8, 32)
    qs = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).reshape(rows, columns // 256, 128)
    sc, m = packed.data["sc"], packed.data["m"]
    scales = torch.cat(((sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6), (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6),
                        (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)), dim=-1)
    halves = [packed.data[k].to(torch.float16).view(torch.uint8).reshape(rows, columns // 256, 2)
              for k in ("d", "dmin")]
    raw = np.ascontiguousarray(torch.cat((*halves, scales, qs), dim=-1).reshape(rows, -1).numpy())
    kind = gguf.GGMLQuantizationType.Q4_K
    return _written(layer, raw, kind)


def _q6_k(layer: Layer) -> Written:
    """sensq's ``q6_k`` as GGUF's Q6_K blocks (210 bytes per 256: 128 bytes of low nibbles, 64 of high bit pairs,
    16 int8 scales, FP16 d). In each half of 128 elements, element ``l`` and ``l + 64`` share the low and high
    nibble of byte ``l`` of ``ql`` (``l < 64``), and the high bit pairs of elements ``l``, ``l + 32``, ``l + 64``,
    ``l + 96`` fill byte ``l`` of ``qh`` from its low bits up (``l < 32``)."""
    import gguf

    packed = layer.packed
    rows, columns = packed.shape
    if columns % 256:
        raise InputError(f"GGUF's Q6_K holds rows of whole 256-element super-blocks; this layer has {columns}")
    q = element_codes(packed).reshape(rows, columns // 256, 2, 128)
    low, high = q & 0xF, q >> 4
    ql = (low[..., :64] | (low[..., 64:] << 4)).reshape(rows, columns // 256, 128)
    qh = (high[..., 0:32] | (high[..., 32:64] << 2) | (high[..., 64:96] << 4) | (high[..., 96:] << 6))
    scales = packed.data["sc"].view(torch.uint8)
    d = packed.data["d"].to(torch.float16).view(torch.uint8).reshape(rows, columns // 256, 2)
    raw = np.ascontiguousarray(torch.cat((ql, qh.reshape(rows, columns // 256, 64), scales, d), dim=-1)
                               .reshape(rows, -1).numpy())
    kind = gguf.GGMLQuantizationType.Q6_K
    return _written(layer, raw, kind)


K_QUANTS = {"q4_k": _q4_k, "q6_k": _q6_k}


def _layer(layer: Layer) -> Written:
    import gguf

    fmt = layer.packed.fmt
    if fmt.family is Family.KQUANT and fmt.name in K_QUANTS and len(layer.packed.shape) == 2:
        return K_QUANTS[fmt.name](layer)
    if fmt.family is not Family.INT or fmt.block_size != BLOCK or len(layer.packed.shape) != 2:
        raise nearest_format(fmt, "q4_k", "int8@32", "GGUF (as ComfyUI-GGUF reads it)")
    rows, columns = layer.packed.shape
    if columns % BLOCK:
        raise InputError(f"{columns} input features are not a multiple of GGUF's block of {BLOCK}")
    codes, scale = _int_codes(layer)
    d = scale.astype(np.float16)
    blocks = codes.reshape(rows, columns // BLOCK, BLOCK)
    if fmt.element_bits == 4:
        q = (blocks + 8).astype(np.uint8)
        qs = q[..., :16] | (q[..., 16:] << 4)
        kind = gguf.GGMLQuantizationType.Q4_0
    else:
        qs = blocks.astype(np.int8).view(np.uint8)
        kind = gguf.GGMLQuantizationType.Q8_0
    raw = np.concatenate((d[..., None].view(np.uint8).reshape(rows, columns // BLOCK, 2), qs), axis=-1)
    raw = np.ascontiguousarray(raw.reshape(rows, -1))
    return _written(layer, raw, kind, "codes kept; the FP32 block scale rounded to FP16")


def _numpy(tensor: torch.Tensor) -> tuple[np.ndarray, object]:
    import gguf

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint8).reshape(*tensor.shape[:-1], -1), \
            gguf.GGMLQuantizationType.BF16
    if tensor.dtype == torch.float16:
        return tensor.numpy(), gguf.GGMLQuantizationType.F16
    return tensor.float().numpy(), gguf.GGMLQuantizationType.F32


def _write(path: Path, tensors: dict, family: str) -> None:
    import gguf

    tmp = temporary_sibling(path, ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch="wan")
    try:
        writer.add_string("sensq.family", family)
        for key, value in tensors.items():
            if isinstance(value, tuple):
                raw, kind, shape = value
                if len(shape) > 2:  # the patch embedding: ComfyUI-GGUF reshapes it back
                    writer.add_array(f"comfy.gguf.orig_shape.{key}", [int(n) for n in shape])
                writer.add_tensor(key, raw, raw_dtype=kind)
                continue
            data, kind = _numpy(value)
            if value.dim() > 4:
                writer.add_array(f"comfy.gguf.orig_shape.{key}", [int(n) for n in value.shape])
                data = data.reshape(value.shape[0], -1)
            writer.add_tensor(key, data, raw_dtype=kind if kind == gguf.GGMLQuantizationType.BF16 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


TARGET = register_target(Target("gguf", ".gguf", "GGUF for ComfyUI-GGUF: Q4_K/Q6_K from q4_k/q6_k, Q4_0 from "
                                "int4@32, Q8_0 from int8@32", _layer, _write))
