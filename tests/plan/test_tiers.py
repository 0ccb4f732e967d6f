"""Precision tiers under a bits budget: the exact search is optimal (checked by brute force), greedy stays
within the budget, the CLI writes a plan that apply-plan deploys."""

import itertools
import json

import numpy as np
import pytest
from click.testing import CliRunner

from sensq.cli import main
from sensq.errors import InputError
from sensq.formats import get_format
from sensq.plan.tiers import allocate, build_tier_plan, pareto, parse_tiers
from sensq.sensitivity.ranking import LayerRank, Ranking

TIERS = ["hif4", "fp8_e4m3", None]


def _layers(n: int, seed: int = 0) -> list[LayerRank]:
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(n):
        hif4 = float(rng.random())
        params, width = int(rng.integers(64, 4096)) * 64, 64 * int(rng.integers(1, 4))
        values = {"hif4": hif4, "fp8_e4m3": hif4 * float(rng.random()) * 0.2}
        layers.append(LayerRank(f"blocks.{i}.ff", "linear", params, width, 64, i == 0, False, values,
                                rank={"hif4": i + 1, "fp8_e4m3": i + 1}))
    return layers


def _bits(tier, layer):
    return 16.0 if tier is None else get_format(tier).bits_per_element(layer.in_features)


@pytest.mark.parametrize("budget", [4.6, 6.0, 9.0, 12.0])
def test_exact_is_the_brute_force_optimum_and_greedy_fits(budget):
    layers = _layers(7)
    params = np.array([layer.params for layer in layers], dtype=float)
    best = None
    for combo in itertools.product(range(3), repeat=len(layers)):
        bits = sum(p * _bits(TIERS[t], layer) for p, t, layer in zip(params, combo, layers, strict=True)) / params.sum()
        if bits <= budget + 1e-9:
            error = sum(0.0 if TIERS[t] is None else layer.value[TIERS[t]] for t, layer in zip(combo, layers,
                                                                                               strict=True))
            best = error if best is None else min(best, error)
    exact = allocate(layers, TIERS, budget, "exact")
    greedy = allocate(layers, TIERS, budget, "greedy")
    assert exact.predicted_error == pytest.approx(best, abs=1e-9)
    assert exact.effective_bits <= budget + 1e-9 and greedy.effective_bits <= budget + 1e-9
    assert greedy.predicted_error >= exact.predicted_error - 1e-12


def test_forced_layers_budget_floor_and_front():
    layers = _layers(6, seed=3)
    forced = allocate(layers, TIERS, 16.0, "exact", forced={layers[0].name: None})
    assert forced.formats[layers[0].name] is None
    with pytest.raises(InputError, match="--bits 4 is below the 4.500 bits per weight"):
        allocate(layers, TIERS, 4.0)
    front = pareto(layers, TIERS)
    errors = [point["predicted_error"] for point in front]
    assert errors == sorted(errors, reverse=True) and errors[-1] == 0.0  # more bits never predict more error
    assert all(point["effective_bits"] <= point["budget_bits"] + 1e-9 for point in front)


def test_tier_plans_refuse_what_cannot_add_up():
    layers = _layers(4)
    sqnr = Ranking("sqnr", "mean", ["hif4", "fp8_e4m3"], {"high": layers}, {}, {}, ["cond"], {})
    with pytest.raises(InputError, match="a sqnr ranking is a quality, not an error"):
        build_tier_plan(sqnr, TIERS, 6.0)
    only_hif4 = Ranking("mse", "mean", ["hif4"], {"high": layers}, {}, {}, ["cond"], {})
    with pytest.raises(InputError, match="the ranking has no 'fp8_e4m3' values"):
        build_tier_plan(only_hif4, TIERS, 6.0)
    with pytest.raises(InputError, match="at least two different formats"):
        parse_tiers("hif4")


def test_cli_tier_plan_is_deployed_by_apply_plan(tmp_path):
    runner = CliRunner()
    probe, ranking, plan = tmp_path / "probe.h5", tmp_path / "ranking.json", tmp_path / "plan.json"
    for args in (["probe", "--limit", "1", "--steps", "2", "--out", str(probe)],
                 ["rank", str(probe), "--format", "hif4,fp8_e4m3", "--out", str(ranking)],
                 ["plan", str(ranking), "--tiers", "hif4,fp8_e4m3,bf16", "--bits", "6", "--pareto", "--out",
                  str(plan)],
                 ["apply-plan", str(plan), "--out", str(tmp_path / "ckpt")]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, (args[0], result.output)
    written = json.loads(plan.read_text())
    assert all(info["effective_bits"] <= 6.0 + 1e-9 for info in written["summary"].values())
    used = {row["weight"] for row in written["layers"]}
    assert used <= {"hif4", "fp8_e4m3", None} and len(used) >= 2
    assert set(written["source"]["pareto"]) == {"high", "low"}
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert {entry["weight"] for entry in manifest["layers"].values()} == used - {None}
    refused = runner.invoke(main, ["plan", str(ranking), "--tiers", "hif4,bf16", "--out", str(tmp_path / "x.json")])
    assert refused.exit_code == 1 and "--tiers needs --bits" in refused.output
