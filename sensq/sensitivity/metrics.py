"""The sensitivity metrics ``sensq rank`` offers: each declared once, with its help text, its direction
and its computation (the error functions themselves are :mod:`sensq.metrics`).

Adding a metric is one :class:`Metric` in :data:`METRICS`: the CLI's choices and help, the ranking's
direction and validation, and the engine that computes it (:func:`sensq.sensitivity.local.layer_scores`
for the local ones, :mod:`sensq.sensitivity.e2e` for ``latents``) all read it from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sensq.metrics import cosine_distance, nmse, sqnr_db

OPERANDS = {
    "output": "the layer's output Y = X W^T + b against Yq = Q(X) Q(W)^T + b, per (step, branch)",
    "weight": "the weight W against Q(W)",
    "input": "the captured inputs X against Q(X), per (step, branch)",
    "latents": "the final latents of the real trajectory against full precision (sensq.sensitivity.e2e)",
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
        return self.operand != "latents"


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("mse", "NMSE of the layer output, W and X quantized: sum (Y - Yq)^2 / sum Y^2", "output", nmse),
    Metric("sqnr", "SQNR of the layer output in dB (10 log10 sum Y^2 / sum (Y - Yq)^2); lower = more sensitive",
           "output", sqnr_db, higher_is_more_sensitive=False),
    Metric("cosine", "1 - cosine similarity of Y and Yq (flattened)", "output", cosine_distance),
    Metric("weight-mse", "NMSE of the weight alone: sum (W - Q(W))^2 / sum W^2", "weight", nmse),
    Metric("act-mse", "NMSE of the captured inputs alone: sum (X - Q(X))^2 / sum X^2", "input", nmse),
    Metric("e2e", "NMSE of the final latents of the real trajectory (same prompts and seeds) against full precision",
           "latents", nmse),
)}
assert all(m.operand in OPERANDS for m in METRICS.values())
