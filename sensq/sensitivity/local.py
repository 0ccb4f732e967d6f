"""Local sensitivity: how much one layer's output moves when its operands are quantized.

For a layer with weight ``W [out, in]`` and captured input rows ``X`` (the probe's samples),
``Y = X W^T + b`` and ``Y_q = Q_a(X) Q_w(W)^T + b`` with ``Q`` grouped along ``in_features``
(weights per output channel, activations per token). Every metric is computed per (step, branch)
from the same GEMMs; one definition each, in :mod:`sensq.metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sensq.formats import FormatSpec, quantize_dequantize
from sensq.metrics import METRICS
from sensq.quant.layers import gemm_weight


@dataclass
class LocalScores:
    """``per_step[fmt]`` is ``[steps, branches]`` of the metric value for one layer."""

    per_step: dict[str, np.ndarray]


def layer_scores(module: torch.nn.Module, samples: np.ndarray, formats: list[FormatSpec], metric: str,
                 backend: str = "auto", outputs: np.ndarray | None = None) -> LocalScores:
    """Scores of one layer for every format.

    Args:
        module: the ``nn.Linear`` (or patch ``Conv3d``) with its full-precision weight.
        samples: probe samples ``[prompt, step, branch, rows, in_features]``.
        formats: formats for both weights and activations (W4A4 in the method).
        metric: a local metric of :data:`sensq.metrics.METRICS`.
        outputs: the layer's recorded outputs at the same rows ``[prompt, step, branch, rows, out_features]``
            (``sensq probe --outputs``): the full-precision reference of mse/sqnr/cosine without recomputing
            the GEMM. ``None``: ``Y = X W^T + b`` from the samples.
    """
    measure = METRICS[metric]
    prompts, steps, branches, rows, width = samples.shape
    weight = gemm_weight(module)
    bias = module.bias.detach().float() if module.bias is not None else None
    # [step, branch, prompt * rows, in]: one GEMM over everything, metrics per (step, branch) slice
    # samples come from the probe file (CPU); the GEMMs run where the weight is
    x = torch.from_numpy(np.ascontiguousarray(samples.transpose(1, 2, 0, 3, 4))).reshape(
        steps * branches, -1, width).to(weight.device)
    groups = range(steps * branches)
    reference = None
    if measure.operand == "output":
        if outputs is not None:
            reference = torch.from_numpy(np.ascontiguousarray(outputs.transpose(1, 2, 0, 3, 4))).reshape(
                steps * branches, -1, outputs.shape[-1]).to(weight.device)
        else:
            reference = F.linear(x, weight, bias)
    out = {}
    for fmt in formats:
        if measure.operand == "weight":
            value = measure.error(weight, quantize_dequantize(weight, fmt, backend=backend))
            values = [value] * len(groups)
        else:
            x_q = quantize_dequantize(x, fmt, backend=backend)
            if measure.operand == "input":
                values = [measure.error(x[g], x_q[g]) for g in groups]
            else:
                approx = F.linear(x_q, quantize_dequantize(weight, fmt, backend=backend), bias)
                values = [measure.error(reference[g], approx[g]) for g in groups]
        out[fmt.identity] = np.array(values, dtype=np.float64).reshape(steps, branches)
    return LocalScores(out)


REDUCTIONS = ("mean", "max", "late-weighted")


def reduce_steps(per_step: np.ndarray, sigmas: np.ndarray, how: str) -> float:
    """One number from ``[steps, branches]`` values: branches are averaged, then steps by ``how``.

    ``late-weighted`` weights step s by 1/sigma_s (normalized): an error injected at a late, low-noise
    step is removed by fewer remaining steps and is amplified by 1/sigma in the x0 estimate.
    """
    per_step = per_step.mean(axis=1)
    finite = np.where(np.isfinite(per_step), per_step, np.nan)
    if how == "mean":
        return float(np.nanmean(finite)) if np.isfinite(finite).any() else math.inf
    if how == "max":
        return float(np.nanmax(finite)) if np.isfinite(finite).any() else math.inf
    keep = np.isfinite(per_step)  # as for mean and max: a non-finite step does not count
    if not keep.any():
        return math.inf
    weights = 1.0 / np.maximum(np.asarray(sigmas, dtype=np.float64)[keep], 1e-6)
    return float(np.sum(weights * per_step[keep]) / np.sum(weights))
