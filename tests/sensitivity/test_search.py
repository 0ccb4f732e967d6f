"""The e2e search: its exact term is the first-order error at a quantized point, and it stays within budget."""

import json

import pytest
import torch
from click.testing import CliRunner

from sensq.cli import main
from sensq.formats import get_format
from sensq.loading import load_model
from sensq.plan import model_layers
from sensq.prompts import load_prompts
from sensq.sensitivity.e2e import E2EJob
from sensq.sensitivity.propagated import linearize
from sensq.sensitivity.search import search_protected
from sensq.trajectory import Trajectory, apply_trajectory, run


@pytest.fixture(scope="module")
def tiny():
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    trajectory = Trajectory(steps=3).with_resolution(model.default_resolution)
    job = E2EJob(trajectory, [load_prompts(None, 1)[0].text], [5], [""])
    return model, job


def test_the_gain_of_the_only_quantized_layer_is_the_error_it_causes(tiny):
    """With one layer quantized, e = J dY to first order, so protecting it is predicted to remove the whole
    measured error: 2 e.J dY - ||J dY||^2 = ||e||^2 (the exact term through the quantized forward, the
    projections for the square)."""
    model, job = tiny
    experts = {e: model.family.expert_module(model.pipe, e) for e in ("high", "low")}
    apply_trajectory(model.pipe, job.trajectory)
    with torch.no_grad():
        references = [run(model.pipe, job.prompts[0], job.trajectory, seed=job.seeds[0]).float()]
    for layer in (("low", "proj_out"), ("high", "blocks.1.attn1.to_out.0")):
        point = linearize(model.pipe, experts, job, get_format("hif4"), family=model.family, projections=128,
                          quantized=frozenset({layer}), references=references)
        assert set(point.scores["high"]) | set(point.scores["low"]) == {layer[1]}
        exact, square = point.exact[layer[0]][layer[1]], point.scores[layer[0]][layer[1]][0]
        assert point.error > 0
        assert exact == pytest.approx(point.error, rel=0.2), layer
        assert 2 * exact - square == pytest.approx(point.error, rel=0.3), layer


def test_the_search_stays_within_budget_and_lowers_the_measured_error(tiny):
    model, job = tiny
    found = search_protected(model, job, get_format("hif4"), 0.3, rounds=3, projections=2)
    infos = {(i.expert, i.name): i.params for i in model_layers(model)}
    for expert in ("high", "low"):
        total = sum(p for (e, _), p in infos.items() if e == expert)
        kept = sum(infos[(expert, name)] for name, _ in found.chosen[expert])
        assert 0 < kept <= 0.3 * total
    measured = [r["measured_nmse"] for r in found.rounds]
    assert measured[0] > found.final and measured[0] == max(measured)
    assert found.generations == 1 * (1 + 3 * (1 + 2 * 3) + 3)


def test_plan_search_e2e_cli(tmp_path):
    runner = CliRunner()
    probe, ranking, plan = tmp_path / "p.h5", tmp_path / "r.json", tmp_path / "plan.json"
    for args in (["probe", "--limit", "1", "--steps", "2", "--out", str(probe)],
                 ["rank", str(probe), "--projections", "1", "--out", str(ranking)]):
        assert runner.invoke(main, args).exit_code == 0
    result = runner.invoke(main, ["plan", str(ranking), "--budget", "20%", "--search", "e2e", "--rounds", "2",
                                  "--projections", "1", "--out", str(plan)])
    assert result.exit_code == 0, result.output
    assert "searched on end-to-end error over 1 prompts" in result.output
    source = json.loads(plan.read_text())["source"]
    assert source["search"] == "e2e" and len(source["rounds"]) == 2 and source["searched_nmse"] > 0
    applied = runner.invoke(main, ["apply-plan", str(plan), "--out", str(tmp_path / "q")])
    assert applied.exit_code == 0, applied.output
    for bad, message in ((["--top-k", "2", "--search", "e2e"], "--search e2e chooses"),
                         (["--budget", "5%", "--search", "exact"], "--search exact goes with --tiers"),
                         (["--budget", "5%", "--search", "e2e", "--probe", str(tmp_path / "missing.h5")],
                          "not a file here")):
        refused = runner.invoke(main, ["plan", str(ranking), *bad, "--out", str(tmp_path / "x.json")])
        assert refused.exit_code == 1 and message in refused.output, (bad, refused.output)


def test_a_round_takes_a_large_layer_whose_gain_exceeds_the_density_fill():
    from sensq.sensitivity.search import _pick

    sizes = {"big": 60, "a": 10, "b": 10, "c": 10}
    gains = {"big": 9.0, "a": 2.0, "b": 1.9, "c": -1.0}
    assert _pick(gains, sizes, remaining=100, share=25) == ["big"]  # the round takes it, over its share
    assert sorted(_pick(gains, sizes, remaining=100, share=80)) == ["a", "b", "big"]  # all fit: the fill itself
    assert _pick({**gains, "big": 3.0}, sizes, remaining=100, share=25) == ["a", "b"]  # the fill gains more
    assert _pick(gains, sizes, remaining=50, share=25) == ["a", "b"]  # the big layer does not fit the budget
