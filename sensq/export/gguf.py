"""GGUF as ComfyUI-GGUF reads it: ``general.architecture = wan``, one tensor type per tensor.

* ``int8@32`` -> Q8_0 (block 32: an FP16 scale ``d`` and 32 int8 codes, ``w = d q``) and ``int4@32`` -> Q4_0
  (block 32: ``d`` and 16 bytes of nibbles, element ``j`` in the low nibble of byte ``j`` and element ``j + 16``
  in its high nibble, ``w = d (q - 8)``): sensq's codes are kept (``q + 8`` for Q4_0) and its FP32 scale is
  rounded to FP16, so each such layer's NMSE against sensq's deployed weight is measured with gguf's own
  dequantizer and reported.
* Every other tensor keeps the dtype sensq ran it in (F32, F16 or BF16). The patch embedding's Conv3d weight
  (five dims; GGUF holds four) is stored flattened to two, with its shape in ``comfy.gguf.orig_shape.<key>``
  as ComfyUI-GGUF's own converter writes it, quantized or not.
* Other quantized formats (HiF4, MXFP4, NVFP4, FP8, INT4/INT8 in other groups) are refused, naming
  ``int4@32`` or ``int8@32``. (GGUF's K-quants would need their own super-block scales: not written yet.)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from sensq.errors import InputError
from sensq.export.target import Layer, Target, Written, nearest_format, nmse, register_target
from sensq.formats.spec import Family
from sensq.store.files import temporary_sibling

BLOCK = 32


def _int_codes(layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """sensq's INT codes ``[rows, K]`` (signed) and FP32 scales ``[rows, K / 32]`` of the layer."""
    packed = layer.packed
    codes = packed.data["codes"]
    if packed.fmt.element_bits == 4:
        nibbles = torch.stack((codes & 0xF, codes >> 4), dim=-1).reshape(codes.shape[0], -1)
        signed = nibbles.to(torch.int16)
        codes = torch.where(signed >= 8, signed - 16, signed)[:, : packed.shape[1]]
    else:
        codes = codes.view(torch.int8)
    return codes.to(torch.int16).numpy(), packed.data["scale"].float().numpy()


def _layer(layer: Layer) -> Written:
    import gguf

    fmt = layer.packed.fmt
    if fmt.family is not Family.INT or fmt.block_size != BLOCK or len(layer.packed.shape) != 2:
        raise nearest_format(fmt, "int4@32", "int8@32", "GGUF (as ComfyUI-GGUF reads it)")
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
    target = torch.from_numpy(gguf.quants.dequantize(raw, kind).astype(np.float32)).reshape(rows, columns)
    error = nmse(target, layer.weight.float())
    return Written({f"{layer.wan}.weight": (raw, kind, layer.shape)}, kind.name, True, error,
                   "" if error == 0 else "codes kept; the FP32 block scale rounded to FP16")


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


TARGET = register_target(Target("gguf", ".gguf", "GGUF for ComfyUI-GGUF: Q4_0 from int4@32, Q8_0 from int8@32",
                                _layer, _write))
