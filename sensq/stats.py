"""Uncertainty of comparisons between model variants: percentile-bootstrap intervals over generations.

A variant's score is a mean over generations (prompt x seed). Two variants are compared *paired*: the
difference is taken per generation (same prompt, same seed) and its mean is bootstrapped, which removes
the prompt-to-prompt spread that both variants share. A difference is called distinguishable from noise
when its 95% interval excludes zero. Resampling is seeded, so a report's intervals are reproducible from
its stated command.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 4000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap interval over ``n`` generations."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def excludes_zero(self) -> bool:
        """Distinguishable from noise: the interval excludes zero, and it is an interval (one generation
        has no spread to resample: never distinguishable)."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def bootstrap_mean(values, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """Percentile-bootstrap interval of the mean of ``values`` (non-finite values are dropped: an infinite
    PSNR means identical frames, which a mean cannot hold).

    Raises:
        ValueError: no finite value.
    """
    data = np.asarray(values, dtype=np.float64)
    data = data[np.isfinite(data)]
    if data.size == 0:
        raise ValueError("no finite value to average")
    if data.size == 1:
        return Interval(float(data[0]), float(data[0]), float(data[0]), 1)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, data.size, size=(resamples, data.size))
    means = data[picks].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(data.mean()), float(low), float(high), int(data.size))


def paired_difference(a, b, **kwargs) -> Interval:
    """Interval of mean(a - b) over paired generations (``a[i]`` and ``b[i]`` share prompt and seed); pairs
    where either value is non-finite are left out."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same shape, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    return bootstrap_mean(a[keep] - b[keep], **kwargs)


def format_interval(interval: Interval | dict, digits: int = 4) -> str:
    """``0.0265 [0.0211, 0.0320]``."""
    values = interval if isinstance(interval, dict) else interval.to_dict()

    def show(value: float) -> str:
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)

    return f"{show(values['mean'])} [{show(values['low'])}, {show(values['high'])}]"
