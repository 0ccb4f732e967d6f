"""Error metrics: one definition each, shared by the tests, the sensitivity engine and the CLI."""

from __future__ import annotations

import math

import torch


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum ref^2 / sum (ref - approx)^2)``.

    Computed in float64. ``inf`` when the two are equal.
    """
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise)


def nmse(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Normalized mean squared error ``sum (ref - approx)^2 / sum ref^2`` (float64; 0 when equal)."""
    ref = reference.double()
    signal = ref.pow(2).sum().item()
    noise = (ref - approx.double()).pow(2).sum().item()
    return noise / signal if signal else (0.0 if noise == 0 else math.inf)


def cosine_distance(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``1 - cos(ref, approx)`` of the flattened tensors (float64; 0 when parallel, 0 when both are 0)."""
    ref, app = reference.double().reshape(-1), approx.double().reshape(-1)
    denominator = ref.norm() * app.norm()
    if denominator == 0:
        return 0.0 if torch.equal(ref, app) else 1.0
    return float(1.0 - (ref @ app) / denominator)
