"""Error metrics: one definition each, shared by the tests, the sensitivity engine and the CLI."""

from __future__ import annotations

import math

import torch


def _energies(reference: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """``(sum ref^2, sum (ref - approx)^2)``: the difference in the inputs' dtype (exact when the two are
    close, Sterbenz), squares summed in float64 without a float64 copy of the tensors."""
    ref = reference.float() if reference.dtype in (torch.bfloat16, torch.float16) else reference
    diff = ref - approx.to(ref.dtype)
    return (torch.sum(ref * ref, dtype=torch.float64).item(), torch.sum(diff * diff, dtype=torch.float64).item())


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum ref^2 / sum (ref - approx)^2)``.

    ``inf`` when the two are equal.
    """
    signal, noise = _energies(reference, approx)
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise)


def nmse(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Normalized mean squared error ``sum (ref - approx)^2 / sum ref^2`` (0 when equal)."""
    signal, noise = _energies(reference, approx)
    return noise / signal if signal else (0.0 if noise == 0 else math.inf)


def cosine_distance(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``1 - cos(ref, approx)`` of the flattened tensors (float64; 0 when parallel, 0 when both are 0)."""
    ref, app = reference.double().reshape(-1), approx.double().reshape(-1)
    denominator = ref.norm() * app.norm()
    if denominator == 0:
        return 0.0 if torch.equal(ref, app) else 1.0
    return float(1.0 - (ref @ app) / denominator)
