"""The ``cpu`` backend: fused numba loops, one pass per 64-block, parallel over blocks.

Matches ``sensq.formats.reference._hif4_encode``/``_hif4_decode`` bit for bit (HiF4 spec §3).
Every arithmetic op below is a float32 op (operands typed ``float32``, no fastmath, no FMA
contraction), which is what the float32 torch reference does. bfloat16 rounding is done on the
integer bits (RNE), never by a float cast.

numba compiles the loops on first use (a few seconds) and caches the result next to this file.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from sensq.formats.spec import FormatSpec

_F32 = np.float32
_INV7 = _F32(0.142578125)  # bf16_RNE(1/7), spec §3 step 2
_SCALE_MIN = _F32(2.0**-48)
_SCALE_MAX = _F32(49152.0)
_REC_MANTISSA = np.array([1.0, 0.80078125, 0.66796875, 0.5703125], dtype=np.float32)  # spec §3 step 6


@intrinsic
def _f32_bits(typingctx, value):
    """Reinterpret a float32 as its uint32 bit pattern."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, bits):
    """Reinterpret uint32 bits as a float32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


def _load(value):
    """float32 value of one element: float32 as is, bfloat16 from its raw uint16 bits."""


@overload(_load)
def _load_impl(value):
    if isinstance(value, types.Float):
        return lambda value: value
    return lambda value: _bits_f32(np.uint32(value) << np.uint32(16))


def _store(out, k, value):
    """Write one float32 result: as is, or as bfloat16 bits (exact: HiF4 values fit in bf16, spec §2.4)."""


@overload(_store)
def _store_impl(out, k, value):
    if isinstance(out.dtype, types.Float):

        def store_float(out, k, value):
            out[k] = value

        return store_float

    def store_bf16(out, k, value):
        out[k] = np.uint16(_f32_bits(value) >> np.uint32(16))

    return store_bf16


@njit
def _pow2(exponent):
    """2**exponent as float32 for a normal exponent (-126..127), built from its bits."""
    return _bits_f32(np.uint32((exponent + 127) << 23))


@njit
def _hif4_four(xb, ob, b4, max4, lv2, rec, sf):  # pragma: no cover - compiled by numba
    """Steps 8-10 for the 4-block starting at ``b4``: lv3 bit, mantissa (half-up, +0.5 in fp32), sign."""
    # x / L and x * (1/L) are the same correctly rounded float for L in {1, 2}: multiply, it is faster
    inv_lv2 = _F32(1.0) / lv2
    lv3 = _F32(2.0) if (max4 * rec) * inv_lv2 >= _F32(2.0) else _F32(1.0)
    inv_lv3 = _F32(1.0) / lv3
    for k in range(b4, b4 + 4):
        v = _load(xb[k])
        t = abs(v) * inv_lv2 * inv_lv3 * rec
        q4 = min(np.floor(t * _F32(4.0) + _F32(0.5)), _F32(7.0))  # saturate: t >= 1.875 -> 1.75 (inf too)
        magnitude = q4 * _F32(0.25) * lv2 * lv3 * sf
        _store(ob, k, -magnitude if v < 0 else magnitude)


@njit
def _hif4_block(xb, ob, rec_mantissa):  # pragma: no cover - compiled by numba
    """One full 64-block: ``xb`` (float32 or bf16 bits) -> ``ob`` (same kind), spec §3 steps 1-10."""
    one = _F32(1.0)
    two = _F32(2.0)
    four = _F32(4.0)
    quarter = _F32(0.25)
    # step 1: the block maximum; any NaN poisons the whole block
    block_max = _F32(0.0)
    n_nan = 0
    for k in range(64):
        a = abs(_load(xb[k]))
        n_nan += a != a
        block_max = a if a > block_max else block_max
    if n_nan:
        for k in range(64):
            _store(ob, k, _F32(np.nan))
        return
    # steps 2-3: s = bf16_RNE(fp32(M * INV7)) clipped to [2^-48, 49152] (the order is irrelevant: both
    # bounds are bf16 values and rounding is monotone); afterwards s is a normal float
    bits = _f32_bits(block_max * _INV7)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    s = min(max(_bits_f32(bits), _SCALE_MIN), _SCALE_MAX)
    # step 5: E6M2 = round-half-even of s's 7-bit bf16 mantissa to 2 bits
    bits = _f32_bits(s)
    exponent = np.int32((bits >> np.uint32(23)) & np.uint32(0xFF)) - 127
    mantissa7 = np.int32((bits >> np.uint32(16)) & np.uint32(0x7F))
    m = mantissa7 >> 5
    rest = mantissa7 & 31
    if rest > 16 or (rest == 16 and (m & 1) == 1):
        m += 1
    if m == 4:
        m = 0
        exponent += 1
    sf = (one + _F32(m) * quarter) * _pow2(exponent)
    # step 6: rec = bf16_RNE(1/sf) = 2^-E * table[m], exactly
    rec = rec_mantissa[m] * _pow2(-exponent)
    # steps 7-10, per 8-block (lv2) and 4-block (lv3)
    for b8 in range(0, 64, 8):
        max_lo = _F32(0.0)
        max_hi = _F32(0.0)
        for k in range(4):
            a = abs(_load(xb[b8 + k]))
            max_lo = a if a > max_lo else max_lo
            a = abs(_load(xb[b8 + 4 + k]))
            max_hi = a if a > max_hi else max_hi
        max8 = max_lo if max_lo > max_hi else max_hi
        lv2 = two if max8 * rec >= four else one
        _hif4_four(xb, ob, b8, max_lo, lv2, rec, sf)
        _hif4_four(xb, ob, b8 + 4, max_hi, lv2, rec, sf)


@njit(parallel=True, cache=True)
def _hif4_rows(x, out, rec_mantissa):  # pragma: no cover - compiled by numba
    rows, length = x.shape
    n_blocks = (length + 63) // 64
    for task in prange(rows * n_blocks):
        r = task // n_blocks
        start = (task % n_blocks) * 64
        stop = min(start + 64, length)
        if stop - start == 64:
            _hif4_block(x[r, start:stop], out[r, start:stop], rec_mantissa)
        else:
            # the tail: zero-pad to a full block (spec §2.2), quantize, crop
            padded = np.zeros(64, dtype=x.dtype)
            padded[: stop - start] = x[r, start:stop]
            result = np.empty(64, dtype=out.dtype)
            _hif4_block(padded, result, rec_mantissa)
            out[r, start:stop] = result[: stop - start]


def quantize_dequantize(x: torch.Tensor, spec: FormatSpec, dim: int) -> torch.Tensor:
    """HiF4 quantize-dequantize of a CPU tensor along ``dim`` (already validated, non-empty)."""
    moved = x.movedim(dim, -1)
    length = moved.shape[-1]
    if x.dtype == torch.bfloat16:
        # numba has no bfloat16: hand it the raw bits (uint16) and get bits back, no conversion pass
        rows = moved.reshape(-1, length).contiguous().view(torch.uint16)
    else:
        rows = moved.to(torch.float32).reshape(-1, length).contiguous()
    out = torch.empty_like(rows)
    _hif4_rows(rows.numpy(), out.numpy(), _REC_MANTISSA)
    if x.dtype == torch.bfloat16:
        out = out.view(torch.bfloat16)
    return out.reshape(moved.shape).movedim(-1, dim).to(x.dtype).contiguous()
