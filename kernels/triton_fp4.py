"""The ``triton`` backend for the E2M1 formats: fused MXFP4 (both variants) and NVFP4 (both variants)
quantize-dequantize and encode along the last dim, one program per ``BLOCK_G`` blocks.

Must match ``sensq.formats.reference._mxfp4_encode`` / ``_mxfp4_decode`` and ``_nvfp4_encode`` /
``_nvfp4_decode`` bit for bit; tested against them under ``TRITON_INTERPRET=1`` (golden pairs, awkward
values and shapes) and on a GPU (marked ``gpu``).

Two choices make that exact on every device rather than on the interpreter only:

* ``floor(log2(y))`` is never computed with ``tl.log2`` (``lg2.approx`` on NVIDIA GPUs). The reference
  floors torch's float32 ``log2``, which is correctly rounded: near a power of two it rounds *up* to the
  next integer (``torch.log2(8 - ulp) == 3.0``), so the floor is not the exponent field. Here it is the
  exponent field plus one when ``y`` reaches a per-binade threshold computed once on the host
  (``kernels/fp4_common.log2_floor_thresholds``); tests/kernels/test_triton_fp4.py checks the rule against torch on
  every float32 near a power of two.
* divisions by non-powers of two use ``div_rn`` (IEEE round-to-nearest; Triton's ``/`` on fp32 is not),
  rounding to E4M3 and half-even rounding are done on exact float32 values, powers of two come from bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sensq.formats.spec import FormatSpec
from sensq.kernels.fp4_common import fp4_kind, log2_floor_thresholds, nvfp4_tensor_scale

BLOCK_G = 64  # blocks per program


@triton.jit
def _pow2(exponent):
    """2**exponent as float32 for integer exponents in [-149, 127] (subnormals from their bits)."""
    normal = ((exponent + 127) << 23).to(tl.uint32)
    tiny = (1 << tl.maximum(exponent + 149, 0)).to(tl.uint32)
    return tl.where(exponent >= -126, normal, tiny).to(tl.float32, bitcast=True)


@triton.jit
def _floor_log2(y, thr_ptr):
    """floor(RN_fp32(log2(y))) as float32, for y >= 0: exact for normal y, +inf for +inf, -inf for 0;
    subnormal y give -127 (every caller clamps there or higher)."""
    bits = y.to(tl.uint32, bitcast=True)
    e = ((bits >> 23) & 0xFF).to(tl.int32) - 127
    e_in = tl.minimum(tl.maximum(e, -126), 127)
    up = y >= tl.load(thr_ptr + (e_in + 126))
    value = (e + up.to(tl.int32)).to(tl.float32)
    value = tl.where(e < -126, -127.0, value)
    value = tl.where(y == float("inf"), float("inf"), value)
    return tl.where(y == 0, float("-inf"), value)


@triton.jit
def _round_half_even(v):
    """torch.round (half to even) for float32 v >= 0, exactly: v - floor(v) is exact (Sterbenz), whereas
    floor(v + 0.5) would round 0.5 - 2^-25 up."""
    r = tl.floor(v)
    frac = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return r + ((frac > 0.5) | ((frac == 0.5) & odd)).to(tl.float32)


@triton.jit
def _e2m1_rne(scaled, thr_ptr):
    """Reference ``_e2m1_rne``: saturate at 6, then round to the E2M1 grid with ties to even."""
    s = tl.minimum(scaled, 6.0)
    exponent = tl.maximum(_floor_log2(s, thr_ptr), 0.0)
    step_inv = _pow2(1 - exponent.to(tl.int32))
    return tl.minimum(_round_half_even(s * step_inv) * _pow2(exponent.to(tl.int32) - 1), 6.0)


@triton.jit
def _e2m1_code(value):
    """Magnitude on the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} -> its 3-bit code."""
    return tl.where(value < 2.0, value * 2.0, tl.where(value < 4.0, value + 2.0, value * 0.5 + 4.0)).to(tl.int32)


@triton.jit
def _e4m3_rne(v):
    """float32 v in [0, 448] rounded to FP8 E4M3 (round-half-even, subnormals 2^-9 apart)."""
    bits = v.to(tl.uint32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF).to(tl.int32) - 127, -6)  # subnormal E4M3 share 2^-6's spacing
    return _round_half_even(v * _pow2(3 - e)) * _pow2(e - 3)


@triton.jit
def _e4m3_code(v):
    """Bits of an E4M3 value v in [0, 448] (already on the grid)."""
    bits = v.to(tl.uint32, bitcast=True)
    e = ((bits >> 23) & 0xFF).to(tl.int32) - 127
    normal = ((e + 7) << 3) | ((bits >> 20) & 7).to(tl.int32)
    subnormal = (v * 512.0).to(tl.int32)  # v = k * 2^-9, k in 0..7
    return tl.where(e >= -6, normal, subnormal)


@triton.jit
def _fp4_tile(x, thr_ptr, tensor_scale, FAMILY: tl.constexpr, VARIANT: tl.constexpr, BLOCK: tl.constexpr,
              GROUP: tl.constexpr):
    """Codes of a float32 tile ``[BLOCK, GROUP]`` (one block per row): E2M1 value (magnitude on the grid),
    the block's scale (float32), its scale code, and whether the block holds a NaN."""
    a = tl.abs(x)
    has_nan = tl.sum((x != x).to(tl.int32), axis=1) > 0
    amax = tl.max(a, axis=1)
    if FAMILY == 0:  # MXFP4
        if VARIANT == 0:  # the HiFloat4 repo (spec §7): +9.6e-7 in log2, elements half-up
            shared = tl.minimum(tl.maximum(_floor_log2(amax + 9.6e-7, thr_ptr) - 2.0, -129.0), 125.0)
            scaled = a * _pow2(-shared.to(tl.int32))[:, None]
            elem = tl.minimum(tl.maximum(_floor_log2(scaled + 9.6e-7, thr_ptr), 0.0), 2.0).to(tl.int32)
            value = tl.minimum(tl.floor(scaled * _pow2(-elem) * 2.0 + 0.5) * 0.5 * _pow2(elem), 6.0)
            shared = tl.maximum(shared, -127.0)
        else:  # OCP MX v1.0: the exact exponent of amax (the spec's floor(log2)), not the rounded-log2 floor
            exact = (((amax.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127).to(tl.float32)
            exact = tl.where(amax == float("inf"), 1000.0, exact)
            shared = tl.minimum(tl.maximum(exact - 2.0, -127.0), 127.0)
            shared = tl.where(amax == 0, -127.0, shared)
            scaled = a * _pow2(-shared.to(tl.int32))[:, None]
            value = _e2m1_rne(scaled, thr_ptr)
        scale = _pow2(shared.to(tl.int32))
        scale_code = (shared + 127.0).to(tl.int32)
    else:  # NVFP4
        if VARIANT == 0:  # the HiFloat4 repo (spec §7)
            sf = tl.minimum(tl.maximum(tl.math.div_rn(amax, 6.0), 0.0), 448.0)
            e = tl.maximum(_floor_log2(sf + 2.842170943040401e-14, thr_ptr), -6.0).to(tl.int32)
            scale = _round_half_even(sf * _pow2(3 - e)) * _pow2(e - 3)
            igv = tl.math.div_rn(a, tl.broadcast_to(scale[:, None], a.shape))
            igv = tl.where((igv == igv) & (igv != float("inf")), igv, 6.0)
            elem = tl.maximum(_floor_log2(igv + 2.842170943040401e-14, thr_ptr), 0.0).to(tl.int32)
            value = tl.minimum(tl.maximum(_round_half_even(igv * _pow2(1 - elem)) * 0.5 * _pow2(elem), 0.0), 6.0)
            effective = scale
        else:  # two-level: FP32 tensor scale x E4M3 block scale
            block = tl.minimum(tl.math.div_rn(tl.math.div_rn(amax, 6.0), tensor_scale), 448.0)
            scale = _e4m3_rne(block)
            effective = scale * tensor_scale
            scaled = tl.math.div_rn(a, tl.broadcast_to(effective[:, None], a.shape))
            value = _e2m1_rne(tl.where((scaled == scaled) & (scaled != float("inf")), scaled, 6.0), thr_ptr)
        value = tl.where(effective[:, None] == 0, 0.0, tl.where(value == value, value, 0.0))
        scale_code = tl.where(has_nan, 0x7F, _e4m3_code(tl.where(scale == scale, scale, 0.0)))
        scale = effective
    value = tl.where(has_nan[:, None], 0.0, value)
    return value, scale, scale_code, has_nan


@triton.jit
def _load_blocks(x_ptr, rows, length, blocks_per_row, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    group = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row = group // blocks_per_row
    cols = ((group % blocks_per_row) * GROUP)[:, None] + tl.arange(0, GROUP)[None, :]
    mask = (group < rows * blocks_per_row)[:, None] & (cols < length)
    x = tl.load(x_ptr + row[:, None].to(tl.int64) * length + cols, mask=mask, other=0.0).to(tl.float32)
    return x, group, row, cols, mask


@triton.jit
def _fp4_qdq_kernel(x_ptr, out_ptr, thr_ptr, tensor_scale, rows, length, blocks_per_row, FAMILY: tl.constexpr,
                    VARIANT: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    x, group, row, cols, mask = _load_blocks(x_ptr, rows, length, blocks_per_row, BLOCK, GROUP)
    value, scale, scale_code, has_nan = _fp4_tile(x, thr_ptr, tensor_scale, FAMILY, VARIANT, BLOCK, GROUP)
    magnitude = value * tl.where(has_nan, float("nan"), scale)[:, None]
    y = tl.where(x < 0, -magnitude, magnitude)
    tl.store(out_ptr + row[:, None].to(tl.int64) * length + cols, y, mask=mask)


@triton.jit
def _fp4_encode_kernel(x_ptr, codes_ptr, scale_ptr, thr_ptr, tensor_scale, rows, length, blocks_per_row,
                       FAMILY: tl.constexpr, VARIANT: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """codes uint8 [G, GROUP] (sign << 3 | E2M1 code; 0 in NaN blocks and the padding), scale uint8 [G]."""
    x, group, row, cols, mask = _load_blocks(x_ptr, rows, length, blocks_per_row, BLOCK, GROUP)
    value, scale, scale_code, has_nan = _fp4_tile(x, thr_ptr, tensor_scale, FAMILY, VARIANT, BLOCK, GROUP)
    code = tl.where(x < 0, 8, 0) + _e2m1_code(value)
    code = tl.where(has_nan[:, None] | (cols >= length), 0, code)
    valid = group < rows * blocks_per_row
    if FAMILY == 0:
        scale_code = tl.where(has_nan, 0xFF, scale_code)
    tl.store(scale_ptr + group, scale_code.to(tl.uint8), mask=valid)
    tl.store(codes_ptr + group[:, None].to(tl.int64) * GROUP + tl.arange(0, GROUP)[None, :], code.to(tl.uint8),
             mask=valid[:, None])


def _launch_args(spec: FormatSpec, rows: torch.Tensor) -> tuple[dict, float]:
    family, variant = fp4_kind(spec)
    tensor_scale = nvfp4_tensor_scale(rows, spec.block_size) if family == 1 and variant == 1 else 1.0
    return {"FAMILY": family, "VARIANT": variant, "BLOCK": BLOCK_G, "GROUP": spec.block_size}, tensor_scale


def _rows(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Size]:
    moved = x.detach().movedim(dim, -1)
    return moved.reshape(-1, moved.shape[-1]).to(torch.float32).contiguous(), moved.shape


def _thresholds(device: torch.device) -> torch.Tensor:
    return torch.from_numpy(log2_floor_thresholds()).to(device)


def quantize_dequantize(x: torch.Tensor, spec: FormatSpec, dim: int) -> torch.Tensor:
    """MXFP4/NVFP4 quantize-dequantize along ``dim`` (validated, non-empty) on the tensor's device."""
    rows, moved_shape = _rows(x, dim)
    n_rows, length = rows.shape
    blocks_per_row = -(-length // spec.block_size)
    meta, tensor_scale = _launch_args(spec, rows)
    out = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    grid = (triton.cdiv(n_rows * blocks_per_row, BLOCK_G),)
    _fp4_qdq_kernel[grid](rows, out, _thresholds(rows.device), tensor_scale, n_rows, length, blocks_per_row, **meta)
    return out.reshape(moved_shape).movedim(-1, dim).to(x.dtype).contiguous()


def encode_fields(x: torch.Tensor, spec: FormatSpec, dim: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The reference ``encode`` fields of ``x`` along ``dim``: codes uint8 ``[rows, blocks, block]``, scale
    codes uint8 ``[rows, blocks]`` (E8M0 for MXFP4, E4M3 bits for NVFP4; NaN blocks 0xFF / 0x7F) and the
    per-tensor scale (1.0 unless ``nvfp4_ts``)."""
    rows, _ = _rows(x, dim)
    n_rows, length = rows.shape
    blocks_per_row = -(-length // spec.block_size)
    meta, tensor_scale = _launch_args(spec, rows)
    codes = torch.empty((n_rows * blocks_per_row, spec.block_size), dtype=torch.uint8, device=rows.device)
    scale = torch.empty((n_rows * blocks_per_row,), dtype=torch.uint8, device=rows.device)
    grid = (triton.cdiv(n_rows * blocks_per_row, BLOCK_G),)
    _fp4_encode_kernel[grid](rows, codes, scale, _thresholds(rows.device), tensor_scale, n_rows, length,
                             blocks_per_row, **meta)
    return (codes.reshape(n_rows, blocks_per_row, spec.block_size), scale.reshape(n_rows, blocks_per_row),
            tensor_scale)
