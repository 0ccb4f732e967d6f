"""Bootstrap intervals and paired comparisons (sensq.stats): coverage, pairing, reproducibility."""

import numpy as np
import pytest

from sensq.stats import bootstrap_mean, format_interval, paired_difference


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    hits = 0
    trials = 300
    for _ in range(trials):
        interval = bootstrap_mean(rng.normal(2.0, 1.0, 30), resamples=1000, seed=int(rng.integers(1 << 30)))
        hits += interval.low <= 2.0 <= interval.high
    assert 0.88 <= hits / trials <= 0.99  # percentile bootstrap at n=30 runs slightly under nominal


def test_pairing_removes_the_shared_spread():
    rng = np.random.default_rng(0)
    prompt_effect = rng.normal(0, 5.0, 32)  # large spread shared by both variants
    a = prompt_effect + 0.5 + rng.normal(0, 0.1, 32)
    b = prompt_effect + rng.normal(0, 0.1, 32)
    unpaired_a, unpaired_b = bootstrap_mean(a), bootstrap_mean(b)
    assert unpaired_a.low < unpaired_b.high  # the separate intervals overlap...
    difference = paired_difference(a, b)
    assert difference.excludes_zero and 0.4 < difference.mean < 0.6  # ...the paired difference does not
    assert not paired_difference(b + rng.normal(0, 0.1, 32), b).excludes_zero


def test_reproducible_non_finite_dropped_and_errors():
    values = [1.0, 2.0, 3.0, float("inf"), 4.0]
    assert bootstrap_mean(values) == bootstrap_mean(values)
    assert bootstrap_mean(values).n == 4 and bootstrap_mean(values).mean == 2.5
    assert bootstrap_mean([3.0]).to_dict() == {"mean": 3.0, "low": 3.0, "high": 3.0, "n": 1}
    with pytest.raises(ValueError, match="no finite value"):
        bootstrap_mean([float("nan")])
    with pytest.raises(ValueError, match="same shape"):
        paired_difference([1.0, 2.0], [1.0])
    assert format_interval({"mean": 0.02649, "low": 0.0221, "high": 0.03031, "n": 8}, 3) == "0.0265 [0.0221, 0.0303]"


def test_one_generation_is_never_distinguishable_from_noise():
    from sensq.stats import paired_difference

    one = paired_difference([0.5], [0.1])
    assert one.n == 1 and not one.excludes_zero
    assert paired_difference([0.5, 0.6, 0.55], [0.1, 0.12, 0.11]).excludes_zero
