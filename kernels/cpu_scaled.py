"""The ``cpu`` backend for the scaled formats: symmetric INT (``int4``, ``int8``) and FP8 E4M3 (``fp8_e4m3``)
with an FP32 absmax scale per group (a block, or the whole row for per-channel/per-token), one pass per
group, parallel over groups.

Matches ``sensq.formats.reference._int_encode``/``_int_decode`` and ``_fp8_encode``/``_fp8_decode`` bit for
bit: float32 ops only (no fastmath, no FMA contraction), round-half-even from ``v - floor(v)``, E4M3
rounding on the exponent taken from the bits (subnormals 2^-9 apart).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from sensq.formats.spec import Family, FormatSpec
from sensq.kernels.cpu import _bits_f32, _f32_bits

_F32 = np.float32
_E4M3_MAX = _F32(448.0)


@njit(cache=True)
def _rhe(v):  # pragma: no cover - compiled by numba
    """torch.round (half to even) of a float32 of any sign, exactly."""
    a = abs(v)
    r = np.floor(a)
    frac = a - r
    if frac > _F32(0.5) or (frac == _F32(0.5) and np.floor(r * _F32(0.5)) * _F32(2.0) != r):
        r = r + _F32(1.0)
    return -r if v < 0 else r


@njit(cache=True)
def _e4m3(v):  # pragma: no cover - compiled by numba
    """float32 v in [-448, 448] rounded to FP8 E4M3 (half to even), as torch's cast does."""
    a = abs(v)
    e = max(np.int32((_f32_bits(a) >> np.uint32(23)) & np.uint32(0xFF)) - 127, -6)
    r = _rhe(a * _bits_f32(np.uint32((130 - e) << 23))) * _bits_f32(np.uint32((e + 124) << 23))
    return -r if _f32_bits(v) >> np.uint32(31) else r  # the sign bit: -0.0 stays -0.0, as torch's cast keeps it


@njit(cache=True)
def _scaled_group(xg, og, qmax, fp8):  # pragma: no cover - compiled by numba
    n = xg.shape[0]
    amax = _F32(0.0)
    finite = True
    for k in range(n):
        a = abs(xg[k])
        if not np.isfinite(a):
            finite = False
        elif a > amax:
            amax = a
    if not finite:
        for k in range(n):
            og[k] = np.nan
        return
    scale = _F32(1.0) if amax == _F32(0.0) else amax / qmax
    for k in range(n):
        v = xg[k] / scale
        if fp8:
            q = _e4m3(min(max(v, -_E4M3_MAX), _E4M3_MAX))
        else:
            q = min(max(_rhe(v), -qmax), qmax) + _F32(0.0)  # + 0.0: an integer code has no -0
        og[k] = q * scale


_GROUPS_PER_TASK = 64


@njit(parallel=True, cache=True)
def _scaled_rows(x, out, group, qmax, fp8):  # pragma: no cover - compiled by numba
    rows, length = x.shape
    n_groups = (length + group - 1) // group
    chunks = (n_groups + _GROUPS_PER_TASK - 1) // _GROUPS_PER_TASK
    for task in prange(rows * chunks):
        r = task // chunks
        first = (task % chunks) * _GROUPS_PER_TASK
        for g in range(first, min(first + _GROUPS_PER_TASK, n_groups)):
            start = g * group
            stop = min(start + group, length)
            if stop - start == group:
                _scaled_group(x[r, start:stop], out[r, start:stop], qmax, fp8)
            else:  # the tail, zero-padded as the reference does (zeros change neither absmax nor codes)
                padded = np.zeros(group, dtype=np.float32)
                padded[: stop - start] = x[r, start:stop]
                result = np.empty(group, dtype=np.float32)
                _scaled_group(padded, result, qmax, fp8)
                out[r, start:stop] = result[: stop - start]


def quantize_dequantize(x: torch.Tensor, spec: FormatSpec, dim: int) -> torch.Tensor:
    """INT/FP8 quantize-dequantize of a CPU tensor along ``dim`` (already validated, non-empty)."""
    moved = x.detach().movedim(dim, -1)
    rows = moved.to(torch.float32).reshape(-1, moved.shape[-1]).contiguous()
    group = spec.block_size or rows.shape[1]
    fp8 = spec.family is Family.FP8
    out = torch.empty_like(rows)
    _scaled_rows(rows.numpy(), out.numpy(), group, _F32(448.0 if fp8 else spec.qmax), fp8)
    return out.reshape(moved.shape).movedim(-1, dim).to(x.dtype).contiguous()
