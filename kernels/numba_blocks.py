"""The ``cpu`` backend for every format but HiF4 (kernels/numba_hif4.py) and BF16 (a cast): fused numba loops,
one pass per block or group, parallel over them.

* MXFP4 (the HiFloat4 repo's variant and OCP MX v1.0) and NVFP4 (the repo's single-level variant and the
  two-level one) match ``sensq.formats.reference._mxfp4_encode``/``_mxfp4_decode`` and
  ``_nvfp4_encode``/``_nvfp4_decode`` bit for bit. ``floor(log2 y)`` as the reference computes it is the
  exponent field plus one when ``y`` reaches its binade's threshold (``kernels/fp4_common.
  log2_floor_thresholds``): torch's float32 log2 is correctly rounded and rounds up to the next integer
  just below most powers of two, which neither the exponent field nor a libm call reproduces by itself.
* INT (``int4``, ``int8``) and FP8 E4M3 (``fp8_e4m3``) with an FP32 absmax scale per group (a block, or the
  whole row for per-channel/per-token) match ``reference._int_encode``/``_int_decode`` and
  ``_fp8_encode``/``_fp8_decode``.

As in kernels/numba_hif4.py every arithmetic op is a float32 op (no fastmath, no FMA contraction). Powers of two
come from bits (subnormals included), rounding half-to-even from ``v - floor(v)`` (exact), E4M3 rounding on
the exponent taken from the bits (subnormals 2^-9 apart).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from sensq.formats.spec import Family, FormatSpec
from sensq.kernels.fp4_common import fp4_kind, log2_floor_thresholds, nvfp4_tensor_scale
from sensq.kernels.numba_hif4 import _f32_bits, _pow2

_F32 = np.float32
_MX_BIAS = _F32(9.6e-7)  # the HiFloat4 repo's log2 bias (spec §7)
_NV_BIAS = _F32(2.0**-45)
_SIX = _F32(6.0)
_E4M3_MAX = _F32(448.0)

MX_REPO, MX_OCP, NV_REPO, NV_TWO_LEVEL, INT, FP8 = 0, 1, 2, 3, 4, 5
"""What a row of blocks holds: the four E2M1 variants (``2 * family + variant`` of
``fp4_common.fp4_kind``), then symmetric INT and FP8 E4M3 with an FP32 absmax scale."""


@njit(cache=True)
def _floor_log2(y, thresholds):  # pragma: no cover - compiled by numba
    """floor(RN_fp32(log2 y)) for y >= 0 as an int: exact for normal y; 1000 for +inf, -1000 for 0 and
    -127 for subnormals (every caller clamps there or higher)."""
    if y == _F32(0.0):
        return -1000
    if y == np.inf:
        return 1000
    e = np.int32((_f32_bits(y) >> np.uint32(23)) & np.uint32(0xFF)) - 127
    if e < -126:
        return -127
    return e + 1 if y >= thresholds[e + 126] else e


@njit(cache=True)
def _exponent(y):  # pragma: no cover - compiled by numba
    """The exact floor(log2 y) for y > 0 (the exponent field; subnormals give -127, inf gives 1000)."""
    if y == np.inf:
        return 1000
    return max(np.int32((_f32_bits(y) >> np.uint32(23)) & np.uint32(0xFF)) - 127, -127)


@njit(cache=True)
def _round_half_even(v):  # pragma: no cover - compiled by numba
    r = np.floor(v)
    frac = v - r
    if frac > _F32(0.5) or (frac == _F32(0.5) and np.floor(r * _F32(0.5)) * _F32(2.0) != r):
        return r + _F32(1.0)
    return r


@njit(cache=True)
def _e2m1_rne(scaled, thresholds):  # pragma: no cover - compiled by numba
    """reference._e2m1_rne: saturate at 6, round to the E2M1 grid with ties to even."""
    s = min(scaled, _SIX)
    exponent = max(_floor_log2(s, thresholds), 0)
    return min(_round_half_even(s * _pow2(1 - exponent)) * _pow2(exponent - 1), _SIX)


@njit(cache=True)
def _e4m3_rne(v):  # pragma: no cover - compiled by numba
    """float32 v in [0, 448] rounded to FP8 E4M3 (half to even; subnormals 2^-9 apart)."""
    e = max(np.int32((_f32_bits(v) >> np.uint32(23)) & np.uint32(0xFF)) - 127, -6)
    return _round_half_even(v * _pow2(3 - e)) * _pow2(e - 3)


@njit(cache=True)
def _fp4_block(xb, ob, variant, tensor_scale, thresholds):  # pragma: no cover - compiled by numba
    """One block (32 for MXFP4, 16 for NVFP4) of float32 ``xb`` -> quantize-dequantized ``ob``."""
    n = xb.shape[0]
    amax = _F32(0.0)
    for k in range(n):
        a = abs(xb[k])
        if a != a:
            for j in range(n):
                ob[j] = np.nan
            return
        amax = a if a > amax else amax
    if variant == MX_REPO:
        shared = min(max(_floor_log2(amax + _MX_BIAS, thresholds) - 2, -129), 125)
        inv, scale = _pow2(-shared), _pow2(max(shared, -127))
        for k in range(n):
            scaled = abs(xb[k]) * inv
            elem = min(max(_floor_log2(scaled + _MX_BIAS, thresholds), 0), 2)
            value = np.floor(scaled * _pow2(-elem) * _F32(2.0) + _F32(0.5)) * _F32(0.5) * _pow2(elem)
            magnitude = min(value, _SIX) * scale
            ob[k] = -magnitude if xb[k] < 0 else magnitude
    elif variant == MX_OCP:  # the exact exponent of amax (OCP's floor(log2)), not the rounded-log2 floor
        shared = -127 if amax == _F32(0.0) else min(max(_exponent(amax) - 2, -127), 127)
        inv, scale = _pow2(-shared), _pow2(shared)
        for k in range(n):
            magnitude = _e2m1_rne(abs(xb[k]) * inv, thresholds) * scale
            ob[k] = -magnitude if xb[k] < 0 else magnitude
    elif variant == NV_REPO:
        sf = min(max(amax / _SIX, _F32(0.0)), _E4M3_MAX)
        e = max(_floor_log2(sf + _NV_BIAS, thresholds), -6)
        scale = _round_half_even(sf * _pow2(3 - e)) * _pow2(e - 3)
        for k in range(n):
            value = _F32(0.0)
            if scale != _F32(0.0):
                igv = abs(xb[k]) / scale
                if not np.isfinite(igv):
                    igv = _SIX
                elem = max(_floor_log2(igv + _NV_BIAS, thresholds), 0)
                value = min(max(_round_half_even(igv * _pow2(1 - elem)) * _F32(0.5) * _pow2(elem), _F32(0.0)),
                            _SIX)
            magnitude = value * scale
            ob[k] = -magnitude if xb[k] < 0 else magnitude
    else:  # NV_TWO_LEVEL
        block = min(amax / _SIX / tensor_scale, _E4M3_MAX)
        effective = _e4m3_rne(block) * tensor_scale
        for k in range(n):
            value = _F32(0.0)
            if effective != _F32(0.0):
                scaled = abs(xb[k]) / effective
                value = _e2m1_rne(scaled if np.isfinite(scaled) else _SIX, thresholds)
            magnitude = value * effective
            ob[k] = -magnitude if xb[k] < 0 else magnitude


@njit(cache=True)
def _scaled_block(xg, og, qmax, fp8):  # pragma: no cover - compiled by numba
    """One group of float32 ``xg`` -> ``og``: symmetric INT in [-qmax, qmax] or FP8 E4M3 (qmax = 448), FP32
    scale absmax / qmax (1 for an all-zero group); a group holding a NaN or an inf is all NaN. Both roundings
    are symmetric, so they run on |v| and the sign is put back: an integer code has no -0 (+0.0), an FP8 one
    keeps it (the sign bit, as torch's cast does)."""
    n = xg.shape[0]
    amax = _F32(0.0)
    for k in range(n):
        a = abs(xg[k])
        if not np.isfinite(a):
            for j in range(n):
                og[j] = np.nan
            return
        amax = a if a > amax else amax
    scale = _F32(1.0) if amax == _F32(0.0) else amax / qmax
    for k in range(n):
        v = xg[k] / scale
        if fp8:
            q = _e4m3_rne(min(abs(v), _E4M3_MAX))
            q = -q if _f32_bits(v) >> np.uint32(31) else q
        else:
            q = min(_round_half_even(abs(v)), qmax)
            q = (-q if v < 0 else q) + _F32(0.0)
        og[k] = q * scale


_BLOCKS_PER_TASK = 128


@njit(parallel=True, cache=True)
def _rows(x, out, group, kind, param, thresholds):  # pragma: no cover - compiled by numba
    """Every ``group``-wide block of every row; ``param`` is the NVFP4 tensor scale or the INT qmax."""
    rows, length = x.shape
    n_blocks = (length + group - 1) // group
    chunks = (n_blocks + _BLOCKS_PER_TASK - 1) // _BLOCKS_PER_TASK
    for task in prange(rows * chunks):
        r = task // chunks
        first = (task % chunks) * _BLOCKS_PER_TASK
        for block in range(first, min(first + _BLOCKS_PER_TASK, n_blocks)):
            start = block * group
            stop = min(start + group, length)
            if stop - start == group:
                xb, ob = x[r, start:stop], out[r, start:stop]
            else:  # the tail, zero-padded to a full block as the reference does
                xb = np.zeros(group, dtype=np.float32)
                xb[: stop - start] = x[r, start:stop]
                ob = np.empty(group, dtype=np.float32)
            if kind <= NV_TWO_LEVEL:
                _fp4_block(xb, ob, kind, param, thresholds)
            else:
                _scaled_block(xb, ob, param, kind == FP8)
            if stop - start != group:
                out[r, start:stop] = ob[: stop - start]


def quantize_dequantize(x: torch.Tensor, spec: FormatSpec, dim: int) -> torch.Tensor:
    """Quantize-dequantize of a CPU tensor along ``dim`` (already validated, non-empty), any format but HiF4
    and BF16."""
    moved = x.detach().movedim(dim, -1)
    rows = moved.to(torch.float32).reshape(-1, moved.shape[-1]).contiguous()
    if spec.family in (Family.MXFP4, Family.NVFP4):
        family, variant = fp4_kind(spec)
        kind = 2 * family + variant
        param = nvfp4_tensor_scale(rows, spec.block_size) if kind == NV_TWO_LEVEL else 1.0
    else:
        kind = FP8 if spec.family is Family.FP8 else INT
        param = 448.0 if kind == FP8 else spec.qmax
    out = torch.empty_like(rows)
    _rows(rows.numpy(), out.numpy(), spec.block_size or rows.shape[1], kind, np.float32(param),
          log2_floor_thresholds())
    return out.reshape(moved.shape).movedim(-1, dim).to(x.dtype).contiguous()
