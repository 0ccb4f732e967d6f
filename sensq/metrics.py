"""Error metrics: one definition each, shared by the tests, the sensitivity engine and the CLI.

The sensitivity metrics ``sensq rank`` offers are declared here once each (:data:`METRICS`: help text,
operand, error function, direction): the CLI's choices and help, the ranking's direction and validation,
the planner and the engines that compute them (:func:`sensq.sensitivity.local.layer_scores` for the local
ones, :mod:`sensq.sensitivity.e2e` for ``latents``) all read them from here. Adding a metric is one
:class:`Metric` entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

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


OPERANDS = {
    "output": "the layer's output Y = X W^T + b against Yq = Q(X) Q(W)^T + b, per (step, branch)",
    "weight": "the weight W against Q(W)",
    "input": "the captured inputs X against Q(X), per (step, branch)",
    "latents": "the final latents of the real trajectory against full precision (sensq.sensitivity.e2e)",
    "gradient": "the layer's output error propagated to first order to the final latents or the step's model output "
                "by random projections backpropagated along the real trajectory (sensq.sensitivity.propagated)",
}
"""What a metric compares."""


@dataclass(frozen=True)
class Metric:
    """One sensitivity metric.

    Attributes:
        name: the ``--metric`` value.
        help: one line for ``sensq rank --help``.
        operand: what is compared (a key of :data:`OPERANDS`).
        error: ``(reference, approx) -> float``.
        higher_is_more_sensitive: False for a quality (SQNR), True for an error.
    """

    name: str
    help: str
    operand: str
    error: Callable[[torch.Tensor, torch.Tensor], float]
    higher_is_more_sensitive: bool = True

    @property
    def local(self) -> bool:
        """Computed from the probe's samples layer by layer (not by running the model)."""
        return self.operand not in ("latents", "gradient")

    @property
    def propagated(self) -> bool:
        """Estimated from backward passes along the real trajectory (:mod:`sensq.sensitivity.propagated`)."""
        return self.operand == "gradient"


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("mse", "NMSE of the layer output, W and X quantized: sum (Y - Yq)^2 / sum Y^2", "output", nmse),
    Metric("sqnr", "SQNR of the layer output in dB (10 log10 sum Y^2 / sum (Y - Yq)^2); lower = more sensitive",
           "output", sqnr_db, higher_is_more_sensitive=False),
    Metric("cosine", "1 - cosine similarity of Y and Yq (flattened)", "output", cosine_distance),
    Metric("weight-mse", "NMSE of the weight alone: sum (W - Q(W))^2 / sum W^2", "weight", nmse),
    Metric("act-mse", "NMSE of the captured inputs alone: sum (X - Q(X))^2 / sum X^2", "input", nmse),
    Metric("grad-e2e", "first-order estimate of e2e from one forward of the real trajectory and --projections "
           "backward passes (random projections of the final latents): every layer of every expert at once",
           "gradient", nmse),
    Metric("grad-step", "like grad-e2e, but projected from each step's model output (memory of one forward; "
           "ignores what later steps do to the error)", "gradient", nmse),
    Metric("e2e", "NMSE of the final latents of the real trajectory (same prompts and seeds) against full precision",
           "latents", nmse),
)}
assert all(m.operand in OPERANDS for m in METRICS.values())

DEFAULT_METRIC = "grad-e2e"
"""What ``sensq rank`` uses unless told: the cheap signal that agrees best with e2e (docs/sensitivity.md)."""
