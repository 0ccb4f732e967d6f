"""Comparison helpers shared by sensq's tests, benchmarks and users checking their own kernels."""

from __future__ import annotations

import torch

_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
         torch.float64: torch.int64}


def bitwise_mismatches(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Boolean mask of positions where ``actual`` and ``expected`` differ bit for bit.

    NaN positions must match but NaN payload and sign are not compared (golden README,
    "Tolerance: exact"); signed zeros are compared.
    """
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(
            f"shape/dtype differ: {tuple(actual.shape)} {actual.dtype} vs {tuple(expected.shape)} {expected.dtype}"
        )
    int_dtype = _BITS[actual.dtype]
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    differ = actual.contiguous().view(int_dtype) != expected.contiguous().view(int_dtype)
    return (nan_a != nan_e) | (differ & ~nan_e)


def assert_bitexact(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Raise an AssertionError naming the count and the first mismatches unless bit-identical."""
    bad = bitwise_mismatches(actual, expected)
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        samples = ", ".join(
            f"{tuple(i)}: got {actual[tuple(i)].item()!r} expected {expected[tuple(i)].item()!r}" for i in where
        )
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ bitwise; first: {samples}"
        )
