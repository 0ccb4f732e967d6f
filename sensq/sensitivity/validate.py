"""Is the cheap proxy any good? Rank correlation of a local ranking with an end-to-end one, per expert.

A local metric (``mse`` ...) costs one GEMM per layer; ``e2e`` (leave-one-in, final-latent NMSE) runs the
model once per layer and is what the plan is meant to predict. :func:`validate_proxy` pairs the two
rankings layer by layer and reports, per expert, Spearman's rho with a percentile-bootstrap interval over
layers (layers resampled with replacement), and flags the proxy as weak when the interval reaches below
:data:`WEAK_BELOW`: then the local ranking is not evidence for which layers matter, and the plan should
come from the e2e ranking (or block e2e for big models).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from sensq.errors import InputError
from sensq.stats import LEVEL, RESAMPLES, Interval

WEAK_BELOW = 0.5
"""A proxy whose rho interval reaches below this is reported as weak."""
TOP_K = 10
"""How many of the most sensitive layers the top-k overlap compares."""


def spearman_interval(x, y, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """Spearman's rho of paired values and its percentile-bootstrap interval over pairs (resamples where every
    pick is tied on one side have no rho and are left out).

    Raises:
        ValueError: fewer than 3 pairs with finite values.
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 3:
        raise ValueError(f"a rank correlation needs at least 3 layers with finite values, got {a.size}")
    rho = float(spearmanr(a, b).statistic)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, a.size, size=(resamples, a.size))
    ranks_a = np.apply_along_axis(_ranks, 1, a[picks])
    ranks_b = np.apply_along_axis(_ranks, 1, b[picks])
    rhos = _pearson_rows(ranks_a, ranks_b)
    rhos = rhos[np.isfinite(rhos)]
    tail = (1 - level) / 2
    low, high = np.quantile(rhos, [tail, 1 - tail]) if rhos.size else (np.nan, np.nan)
    return Interval(rho, float(low), float(high), int(a.size))


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as Spearman's rho uses them."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.arange(values.size, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))


def require_layer_e2e(e2e) -> None:
    """Raises InputError unless ``e2e`` is a per-layer e2e ranking (what a proxy is checked against)."""
    from sensq.metrics import METRICS

    if METRICS[e2e.metric].operand != "latents" or e2e.granularity != "layer":
        raise InputError(f"--validate needs a per-layer e2e ranking (got metric {e2e.metric!r}, granularity "
                         f"{e2e.granularity!r})")


def require_same_source(e2e, fingerprint: str, trajectory: dict, path) -> None:
    """Raises InputError (one line) unless ``e2e`` was measured on the model with this weight ``fingerprint`` along
    this ``trajectory`` (the probe's): a check against another model's or trajectory's damage is no check."""
    recorded = e2e.provenance.get("model_fingerprint")
    if recorded != fingerprint:
        raise InputError(f"{str(path)!r} was measured on another model (fingerprint {recorded}, this probe's model "
                         f"{fingerprint}): validate against an e2e ranking of the same model, or pass --force")
    theirs = e2e.provenance.get("trajectory") or {}
    differ = sorted(key for key in set(theirs) | set(trajectory) if theirs.get(key) != trajectory.get(key))
    if differ:
        key = differ[0]
        raise InputError(f"{str(path)!r} was measured along another trajectory ({key}: {theirs.get(key)!r} vs the "
                         f"probe's {trajectory.get(key)!r}): rank it from a probe of this trajectory, or pass --force")


def validate_proxy(local, e2e, fmt: str | None = None, against: str = "") -> dict:
    """Per expert, how well ``local``'s values order the layers as ``e2e``'s do (both :class:`Ranking`).

    The sign is such that rho > 0 means agreement whatever the metrics' directions (SQNR: higher is less
    sensitive). Returns ``{"against": ..., "format": fmt, "experts": {expert: {"spearman": Interval dict,
    "layers": n, "weak": bool, "top_k": k,
    "top_k_overlap": shared layers among both rankings' top k, "top_disagreements": [...]}}}``.

    Raises:
        InputError: ``e2e`` is not a per-layer e2e ranking, the two share no expert or format, or an expert
            has fewer than 3 layers in common.
    """
    from sensq.metrics import METRICS

    require_layer_e2e(e2e)
    fmt = fmt or local.formats[0]
    if fmt not in e2e.formats:
        raise InputError(f"the e2e ranking has no {fmt!r} scores (it ranks {', '.join(e2e.formats)})")
    shared = [e for e in local.experts if e in e2e.experts]
    if not shared:
        raise InputError(f"the rankings share no expert ({', '.join(local.experts)} vs {', '.join(e2e.experts)})")
    sign = 1.0 if METRICS[local.metric].higher_is_more_sensitive else -1.0
    out = {}
    for expert in shared:
        truth = {layer.name: layer for layer in e2e.experts[expert]}
        pairs = [(layer, truth[layer.name]) for layer in local.experts[expert] if layer.name in truth]
        if len(pairs) < 3:
            raise InputError(f"{expert}: only {len(pairs)} layers are in both rankings; a correlation needs 3")
        try:
            interval = spearman_interval([sign * a.value[fmt] for a, _ in pairs], [b.value[fmt] for _, b in pairs])
        except ValueError as error:  # fewer than 3 layers with finite values on both sides
            raise InputError(f"{expert}: cannot check the ranking against {against or 'the e2e ranking'}: "
                             f"{error}") from None
        moved = sorted(pairs, key=lambda p: -abs(p[0].rank[fmt] - p[1].rank[fmt]))[:5]
        top = min(TOP_K, len(pairs))
        local_top = {a.name for a, _ in sorted(pairs, key=lambda p: p[0].rank[fmt])[:top]}
        truth_top = {b.name for _, b in sorted(pairs, key=lambda p: p[1].rank[fmt])[:top]}
        out[expert] = {
            "spearman": interval.to_dict(), "layers": len(pairs), "weak": not interval.low >= WEAK_BELOW,
            "top_k": top, "top_k_overlap": len(local_top & truth_top),
            "top_disagreements": [{"layer": a.name, "local_rank": a.rank[fmt], "e2e_rank": b.rank[fmt]}
                                  for a, b in moved],
        }
    return {"against": against, "metric": local.metric, "format": fmt,
            "weak_below": WEAK_BELOW, "experts": out}
