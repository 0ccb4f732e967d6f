"""What the E2M1-format kernels of both backends (kernels/numba_blocks.py, kernels/triton_fp4.py) take from the
host: numpy and torch only, so that neither backend needs the other's compiler."""

from __future__ import annotations

import functools

import numpy as np
import torch

from sensq.formats.spec import Family, FormatSpec, MXVariant


def fp4_kind(spec: FormatSpec) -> tuple[int, int]:
    """``(family, variant)`` of an E2M1 format as the kernels number them: family 0 MXFP4 (variant 0 the
    HiFloat4 repo's, 1 OCP MX), family 1 NVFP4 (variant 0 the repo's single-level, 1 the two-level one)."""
    if spec.family is Family.MXFP4:
        return 0, 0 if spec.mx_variant is MXVariant.HIFLOAT4_REPO else 1
    return 1, 1 if spec.tensor_scale_bits > 0 else 0


@functools.cache
def log2_floor_thresholds() -> np.ndarray:
    """``t[e + 126]`` for each float32 binade ``[2^e, 2^(e+1))``, e in [-126, 127]: the smallest float32 ``y``
    of the binade whose correctly rounded float32 ``log2`` is ``e + 1`` (``inf`` when none is).

    ``floor(torch.log2(y))`` (torch's float32 log2 is correctly rounded) is then the exponent field of ``y``
    plus one when ``y >= t[e + 126]``: just below most powers of two log2 rounds up to the next integer,
    e.g. ``torch.log2(8 - ulp) == 3``.
    """
    out = np.full(254, np.inf, dtype=np.float32)
    for e in range(-126, 128):
        low = int(np.array(np.float32(2.0) ** np.float32(e), dtype=np.float32).view(np.int32))
        high = low + (1 << 23) - 1  # the largest float32 of the binade

        def rounds_up(bits: int, e: int = e) -> bool:
            y = np.array(bits, dtype=np.int32).view(np.float32)
            return np.floor(np.float32(np.log2(np.float64(y)))) > e

        if not rounds_up(high):
            continue
        lo, hi = low, high  # invariant: rounds_up(hi); the band that rounds up is the binade's top
        while lo < hi:
            mid = (lo + hi) // 2
            if rounds_up(mid):
                hi = mid
            else:
                lo = mid + 1
        out[e + 126] = np.array(lo, dtype=np.int32).view(np.float32)
    return out


def nvfp4_tensor_scale(rows: torch.Tensor, block_size: int) -> float:
    """The two-level NVFP4 per-tensor FP32 scale of float32 ``rows [n, length]``: amax / (448 * 6) over the
    blocks whose maximum is finite (a block holding an inf or a NaN does not count); 1.0 when that is 0."""
    n_rows, length = rows.shape
    padded = torch.nn.functional.pad(rows, (0, -length % block_size))
    block_max = padded.abs().reshape(n_rows, -1, block_size).amax(-1)
    amax = torch.where(torch.isfinite(block_max), block_max, 0.0).amax()
    return float(amax / (448.0 * 6.0)) if amax > 0 else 1.0
