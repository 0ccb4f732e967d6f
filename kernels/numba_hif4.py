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
    """2**exponent as float32 for an integer exponent in [-149, 127], built from its bits (subnormals too)."""
    if exponent >= -126:
        return _bits_f32(np.uint32((exponent + 127) << 23))
    return _bits_f32(np.uint32(1) << np.uint32(exponent + 149))


@njit
def _hif4_block(xb, ob, rec_mantissa, factor, out_scale):  # pragma: no cover - compiled by numba
    """One full 64-block: ``xb`` (float32 or bf16 bits) -> ``ob`` (same kind), spec §3 steps 1-10.

    ``factor`` and ``out_scale`` are 16-float scratch arrays (one entry per 4-block).

    The mantissa step is fused: the spec's ``t = F(F(F(a/L2)/L3)*rec)`` then ``F(F(t*4)+0.5)``
    becomes ``F(F(a*f)+0.5)`` with ``f = 4*rec/(L2*L3)`` (exact: powers of two times a bf16 value).
    Dividing or multiplying by a power of two is exact unless the result leaves the normal range, so
    both forms round the same real number once, except when ``a/L2`` or ``a*f`` is subnormal (then
    ``a < 2^-124`` and ``t < 2^-74``: q = 0 either way) or overflows (then q saturates to 7 either
    way). Likewise the output ``q * 0.25 * L2 * L3 * sf`` is exact in any order. Tested bit-exact
    against the reference on random bit patterns, subnormals, Inf and NaN.
    """
    # step 1: maxima per 4-block (kept in ``factor`` until step 8 overwrites them) and per block;
    # any NaN poisons the whole block
    block_max = _F32(0.0)
    n_nan = 0
    for j in range(16):
        max4 = _F32(0.0)
        for k in range(4 * j, 4 * j + 4):
            a = abs(_load(xb[k]))
            n_nan += a != a
            max4 = a if a > max4 else max4
        factor[j] = max4
        block_max = max4 if max4 > block_max else block_max
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
    sf = (_F32(1.0) + _F32(m) * _F32(0.25)) * _pow2(exponent)
    # step 6: rec = bf16_RNE(1/sf) = 2^-E * table[m], exactly
    rec = rec_mantissa[m] * _pow2(-exponent)
    # steps 7-8: lv2 per 8-block, lv3 per 4-block (x / L == x * (1/L) exactly for L in {1, 2})
    for j8 in range(8):
        max_lo = factor[2 * j8]
        max_hi = factor[2 * j8 + 1]
        max8 = max_lo if max_lo > max_hi else max_hi
        lv2 = _F32(2.0) if max8 * rec >= _F32(4.0) else _F32(1.0)
        inv_lv2 = _F32(1.0) / lv2
        lv3_lo = _F32(2.0) if (max_lo * rec) * inv_lv2 >= _F32(2.0) else _F32(1.0)
        lv3_hi = _F32(2.0) if (max_hi * rec) * inv_lv2 >= _F32(2.0) else _F32(1.0)
        factor[2 * j8] = _F32(4.0) * rec * inv_lv2 / lv3_lo
        factor[2 * j8 + 1] = _F32(4.0) * rec * inv_lv2 / lv3_hi
        out_scale[2 * j8] = _F32(0.25) * lv2 * lv3_lo * sf
        out_scale[2 * j8 + 1] = _F32(0.25) * lv2 * lv3_hi * sf
    # steps 9-10: mantissa (half-up, +0.5 in fp32, saturating at 1.75: q4 = 7), sign
    for k in range(64):
        v = _load(xb[k])
        q4 = min(np.floor(abs(v) * factor[k >> 2] + _F32(0.5)), _F32(7.0))
        magnitude = q4 * out_scale[k >> 2]
        _store(ob, k, -magnitude if v < 0 else magnitude)


_BLOCKS_PER_TASK = 64


@njit(parallel=True, cache=True)
def _hif4_rows(x, out, rec_mantissa):  # pragma: no cover - compiled by numba
    rows, length = x.shape
    n_blocks = (length + 63) // 64
    chunks = (n_blocks + _BLOCKS_PER_TASK - 1) // _BLOCKS_PER_TASK
    for task in prange(rows * chunks):
        r = task // chunks
        first = (task % chunks) * _BLOCKS_PER_TASK
        factor = np.empty(16, dtype=np.float32)
        out_scale = np.empty(16, dtype=np.float32)
        for block in range(first, min(first + _BLOCKS_PER_TASK, n_blocks)):
            start = block * 64
            stop = min(start + 64, length)
            if stop - start == 64:
                _hif4_block(x[r, start:stop], out[r, start:stop], rec_mantissa, factor, out_scale)
            else:
                # the tail: zero-pad to a full block (spec §2.2), quantize, crop
                padded = np.zeros(64, dtype=x.dtype)
                padded[: stop - start] = x[r, start:stop]
                result = np.empty(64, dtype=out.dtype)
                _hif4_block(padded, result, rec_mantissa, factor, out_scale)
                out[r, start:stop] = result[: stop - start]


def quantize_dequantize(x: torch.Tensor, spec: FormatSpec, dim: int) -> torch.Tensor:
    """HiF4 quantize-dequantize of a CPU tensor along ``dim`` (already validated, non-empty)."""
    moved = x.detach().movedim(dim, -1)  # quantization has no useful gradient; numba needs plain arrays
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


@njit(parallel=True, cache=True)
def _hif4_unpack_rows(blocks, out):  # pragma: no cover - compiled by numba
    """Spec §6 blocks ``uint8 [rows, n_blocks, 36]`` -> values ``[rows, length]`` (float32, or bf16 bits as
    uint16). Every value ``q/4 * L2 * L3 * sf`` is exact in float32 in any order, and exact in bf16."""
    rows, n_blocks = blocks.shape[0], blocks.shape[1]
    length = out.shape[1]
    for task in prange(rows * n_blocks):
        r = task // n_blocks
        b = task % n_blocks
        row = out[r]
        start = b * 64
        stop = min(start + 64, length)
        code = np.int32(blocks[r, b, 0])
        if code == 0xFF:  # a NaN block
            for k in range(start, stop):
                _store(row, k, _F32(np.nan))
            continue
        lv2 = np.int32(blocks[r, b, 1])
        lv3 = np.int32(blocks[r, b, 2]) | (np.int32(blocks[r, b, 3]) << 8)
        sf = (_F32(1.0) + _F32(code & 3) * _F32(0.25)) * _pow2((code >> 2) - 48)
        local = np.empty(16, dtype=np.float32)
        for j in range(16):
            shift = ((lv2 >> (j >> 1)) & 1) + ((lv3 >> j) & 1)
            local[j] = _F32(0.25) * _F32(1 << shift) * sf
        for k in range(stop - start):
            byte = np.int32(blocks[r, b, 4 + (k >> 1)])
            nibble = (byte >> 4) if k & 1 else (byte & 15)
            magnitude = _F32(nibble & 7) * local[k >> 2]
            _store(row, start + k, -magnitude if nibble & 8 else magnitude)


def unpack_hif4(blocks: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Decode HiF4 blocks ``uint8 [rows, n_blocks, 36]`` into ``out`` ``[rows, length]`` (float32 or bfloat16,
    contiguous, on the CPU), in place; the same values as ``sensq.formats.unpack`` bit for bit (tested)."""
    target = out.view(torch.uint16) if out.dtype == torch.bfloat16 else out
    _hif4_unpack_rows(blocks.numpy(), target.numpy())
    return out
