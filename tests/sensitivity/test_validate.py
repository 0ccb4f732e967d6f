"""The proxy check: Spearman rho of a local ranking against an e2e one, with a bootstrap interval."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.stats import rankdata, spearmanr

from sensq.cli import main
from sensq.errors import InputError
from sensq.loading import load_model
from sensq.probes.recorder import ProbeRequest, run_probe
from sensq.prompts import load_prompts
from sensq.sensitivity.ranking import LayerRank, Ranking
from sensq.sensitivity.validate import _ranks, spearman_interval, validate_proxy
from sensq.trajectory import Trajectory


def _ranking(metric: str, values: dict[str, list[float]], granularity: str = "layer") -> Ranking:
    experts = {}
    for expert, vals in values.items():
        sign = -1 if metric != "sqnr" else 1
        order = np.argsort(sign * np.asarray(vals), kind="stable")
        ranks = np.empty(len(vals), dtype=int)
        ranks[order] = np.arange(1, len(vals) + 1)
        experts[expert] = [LayerRank(f"l{i}", "linear", 1, 8, 8, False, False, {"hif4": float(v)},
                                     rank={"hif4": int(r)}) for i, (v, r) in enumerate(zip(vals, ranks, strict=True))]
    return Ranking(metric, "mean", ["hif4"], experts, {}, {}, ["cond"], {}, granularity=granularity)


def test_average_ranks_match_scipy():
    values = np.array([3.0, 1.0, 3.0, 2.0, 3.0, -1.0])
    np.testing.assert_array_equal(_ranks(values) + 1, rankdata(values))


def test_interval_of_agreement_disagreement_and_noise():
    x = np.arange(30.0)
    same = spearman_interval(x, x ** 3)
    assert (same.mean, same.low, same.high, same.n) == (1.0, 1.0, 1.0, 30)
    assert spearman_interval(x, -x).high == -1.0
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(200), rng.standard_normal(200)
    noise = spearman_interval(a, b)
    assert noise.mean == pytest.approx(spearmanr(a, b).statistic)
    assert noise.low < 0 < noise.high
    with pytest.raises(ValueError, match="at least 3 layers"):
        spearman_interval([1.0, np.nan, 2.0], [1.0, 2.0, 3.0])


def test_validation_per_expert_with_direction_and_warnings():
    rng = np.random.default_rng(0)
    truth = rng.random(40)
    e2e = _ranking("e2e", {"high": list(truth), "low": list(truth)})
    good = _ranking("mse", {"high": list(truth * 2 + 0.01 * rng.random(40)), "low": list(rng.random(40))})
    result = validate_proxy(good, e2e)
    assert result["experts"]["high"]["spearman"]["mean"] > 0.99 and not result["experts"]["high"]["weak"]
    assert result["experts"]["low"]["weak"]  # an unrelated proxy
    # SQNR: higher is *less* sensitive; a SQNR that falls as the e2e error grows agrees (rho > 0)
    sqnr = _ranking("sqnr", {"high": list(-10 * np.log10(truth)), "low": list(-10 * np.log10(truth))})
    assert validate_proxy(sqnr, e2e)["experts"]["high"]["spearman"]["mean"] == pytest.approx(1.0)


def test_validation_refuses_what_it_cannot_compare():
    local = _ranking("mse", {"high": [1.0, 2.0, 3.0]})
    with pytest.raises(InputError, match="needs a per-layer e2e ranking"):
        validate_proxy(local, _ranking("e2e", {"high": [1.0, 2.0, 3.0]}, granularity="block"))
    with pytest.raises(InputError, match="needs a per-layer e2e ranking"):
        validate_proxy(local, _ranking("mse", {"high": [1.0, 2.0, 3.0]}))
    with pytest.raises(InputError, match="share no expert"):
        validate_proxy(local, _ranking("e2e", {"low": [1.0, 2.0, 3.0]}))
    with pytest.raises(InputError, match="high: cannot check the ranking against .*at least 3 layers with finite"):
        validate_proxy(local, _ranking("e2e", {"high": [float("nan")] * 3}))


def test_cli_rank_validate(tmp_path):
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    probe = tmp_path / "probe.h5"
    trajectory = Trajectory(steps=2).with_resolution(model.default_resolution)
    run_probe(ProbeRequest(model, trajectory, load_prompts(None, 1), ["low"], probe))
    runner = CliRunner()
    e2e = runner.invoke(main, ["rank", str(probe), "--metric", "e2e", "--out", str(tmp_path / "e2e.json")])
    assert e2e.exit_code == 0, e2e.output
    checked = runner.invoke(main, ["rank", str(probe), "--validate", str(tmp_path / "e2e.json"),
                                   "--out", str(tmp_path / "ranking.json")])
    assert checked.exit_code == 0, checked.output
    assert "proxy check, low-noise expert: grad-e2e vs e2e over 27 layers, Spearman rho" in checked.output
    stored = json.loads((tmp_path / "ranking.json").read_text())["validation"]
    assert stored["against"] == str(tmp_path / "e2e.json") and stored["experts"]["low"]["layers"] == 27
    again = Ranking.load(tmp_path / "ranking.json")  # the stored validation is part of the schema
    assert again.validation == stored
    wrong = runner.invoke(main, ["rank", str(probe), "--validate", str(tmp_path / "ranking.json"),
                                 "--out", str(tmp_path / "r2.json")])
    assert wrong.exit_code == 1 and "needs a per-layer e2e ranking (got metric 'grad-e2e'" in wrong.output
