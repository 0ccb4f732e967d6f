"""Propagated sensitivity (grad-e2e, grad-step): the estimate is the first-order end-to-end error it claims to be."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sensq.cli import main
from sensq.formats import get_format
from sensq.loading import load_model
from sensq.models.layers import quantizable_layers
from sensq.prompts import load_prompts
from sensq.quant import quantize_module
from sensq.sensitivity import Ranking
from sensq.sensitivity.e2e import E2EJob
from sensq.sensitivity.propagated import propagated_scores
from sensq.trajectory import Trajectory, apply_trajectory, run

LAYERS = [("high", "blocks.0.attn1.to_v"), ("low", "blocks.1.ffn.net.2"), ("low", "proj_out")]


@pytest.fixture(scope="module")
def tiny():
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    prompt = load_prompts(None, 1)[0]
    trajectory = Trajectory(steps=4).with_resolution(model.default_resolution)  # CFG: two branches per step
    job = E2EJob(trajectory, [prompt.text], [3], [""])
    return model, job


def _nudged_latents(model, job, expert, name, scale):
    """Final latents with ``scale * dY`` added to one layer's output at every call (dY: its HiF4 W4A4 error)."""
    module = model.family.expert_module(model.pipe, expert).get_submodule(name)
    twin = quantize_module(module, get_format("hif4"), get_format("hif4"))

    def nudge(_, args, output):
        return output + scale * (twin(args[0]) - output)

    handle = module.register_forward_hook(nudge)
    try:
        apply_trajectory(model.pipe, job.trajectory)
        return run(model.pipe, job.prompts[0], job.trajectory, seed=job.seeds[0]).double()
    finally:
        handle.remove()


def test_grad_e2e_estimates_the_first_order_end_to_end_error(tiny):
    """||J dY||^2 / ||z||^2 from a central finite difference of the real trajectory, against the projections'
    estimate (256 projections: relative spread about 9%)."""
    model, job = tiny
    experts = {e: model.family.expert_module(model.pipe, e) for e in ("high", "low")}
    scores = propagated_scores(model.pipe, experts, job, get_format("hif4"), family=model.family,
                               metric="grad-e2e", projections=256)
    eps = 1e-2
    for expert, name in LAYERS:
        plus = _nudged_latents(model, job, expert, name, eps)
        minus = _nudged_latents(model, job, expert, name, -eps)
        reference = _nudged_latents(model, job, expert, name, 0.0)
        jdy = (plus - minus) / (2 * eps)
        truth = float((jdy * jdy).sum() / (reference * reference).sum())
        estimate, per_step = scores[expert][name]
        assert truth > 0
        assert estimate == pytest.approx(truth, rel=0.3), (expert, name)
        assert per_step.shape == (4, 2) and np.all(per_step >= 0)


def test_the_model_is_left_as_it_was(tiny):
    model, job = tiny
    apply_trajectory(model.pipe, job.trajectory)
    before = run(model.pipe, job.prompts[0], job.trajectory, seed=job.seeds[0])
    experts = {e: model.family.expert_module(model.pipe, e) for e in ("high", "low")}
    grads = [p.requires_grad for m in experts.values() for p in m.parameters()]
    for metric in ("grad-e2e", "grad-step"):
        propagated_scores(model.pipe, experts, job, get_format("hif4"), family=model.family, metric=metric,
                          projections=1)
    assert grads == [p.requires_grad for m in experts.values() for p in m.parameters()]
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks
                   for e in experts.values() for _, m in quantizable_layers(e))
    apply_trajectory(model.pipe, job.trajectory)
    assert torch.equal(before, run(model.pipe, job.prompts[0], job.trajectory, seed=job.seeds[0]))


def test_grad_step_scores_each_step_where_it_runs(tiny):
    """grad-step projects each step's model output: an expert's layers have terms only at its own steps, and a
    layer's value is the step's output NMSE to first order (checked against a finite difference at one step)."""
    model, job = tiny
    experts = {e: model.family.expert_module(model.pipe, e) for e in ("high", "low")}
    scores = propagated_scores(model.pipe, experts, job, get_format("hif4"), family=model.family,
                               metric="grad-step", projections=2)
    from sensq.trajectory import plan_steps

    apply_trajectory(model.pipe, job.trajectory)
    routed = [s.expert for s in plan_steps(model.pipe, model.family, job.trajectory)]
    for expert in ("high", "low"):
        per_step = scores[expert]["proj_out"][1]
        for step, owner in enumerate(routed):
            assert (per_step[step] > 0).all() == (owner == expert)


def test_rank_cli_grad_e2e_validates_and_plans_from_the_data(workspace, tmp_path):
    """sensq rank --metric grad-e2e writes a ranking; --validate checks it against e2e; sensq plan from it does
    not force the entrance (the data decides) while a plan from a local ranking still does."""
    runner = CliRunner()
    probe, e2e, ranking = workspace / "probe.h5", tmp_path / "e2e.json", tmp_path / "grad.json"
    result = runner.invoke(main, ["rank", str(probe), "--metric", "e2e", "--limit", "1", "--out", str(e2e)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["rank", str(probe), "--metric", "grad-e2e", "--projections", "2",
                                  "--validate", str(e2e), "--out", str(ranking)])
    assert result.exit_code == 0, result.output
    assert "grad-e2e vs e2e" in result.output and "top-10 overlap" in result.output
    loaded = Ranking.load(ranking)
    assert loaded.metric == "grad-e2e" and loaded.mode is None
    assert set(loaded.validation["experts"]) == set(loaded.experts)
    plan = tmp_path / "plan.json"
    result = runner.invoke(main, ["plan", str(ranking), "--budget", "5%", "--out", str(plan), "--json"])
    assert result.exit_code == 0, result.output
    import json

    source = json.loads(plan.read_text())["source"]
    assert source["protect_entrance"] is False
    local = tmp_path / "mse.json"
    assert runner.invoke(main, ["rank", str(probe), "--metric", "mse", "--out", str(local)]).exit_code == 0
    result = runner.invoke(main, ["plan", str(local), "--budget", "5%", "--out", str(plan)])
    assert json.loads(plan.read_text())["source"]["protect_entrance"] is True


@pytest.mark.parametrize("args, says", [
    (["rank", "{probe}", "--metric", "mse", "--limit", "2"], "--limit applies to e2e, grad-e2e and grad-step"),
    (["rank", "{probe}", "--mode", "leave-one-out"], "--mode applies to --metric e2e only"),
    (["rank", "{probe}", "--metric", "mse", "--projections", "3"], "--projections applies to --metric grad-e2e"),
    (["rank", "{probe}", "--reduce", "max"], "--reduce applies to per-step metrics"),
    (["plan", "{ranking}", "--budget", "5%", "--bits", "6"], "--bits goes with --tiers"),
    (["plan", "{ranking}", "--budget", "5%", "--pareto"], "--pareto goes with --tiers"),
    (["plan", "{ranking}", "--budget", "5%", "--rounds", "2"], "--rounds goes with --search e2e"),
])
def test_options_that_mean_nothing_here_are_refused(workspace, tmp_path, args, says):
    """An option the chosen metric or mode does not read is refused in one line, not ignored."""
    args = [a.format(probe=workspace / "probe.h5", ranking=workspace / "ranking.json") for a in args]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out.json")])
    assert result.exit_code == 2 and says in result.output, result.output
    assert not (tmp_path / "out.json").exists()


def test_refused_options(workspace, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["rank", str(workspace / "probe.h5"), "--metric", "grad-e2e", "--granularity",
                                  "block", "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 2 and "--granularity applies to --metric e2e only" in result.output


def test_checkpointing_recomputes_and_gives_the_same_scores(tiny):
    """--checkpoint: each expert call and block is recomputed in the backward passes (more layer calls) and the
    scores are the same."""
    model, job = tiny
    experts = {e: model.family.expert_module(model.pipe, e) for e in ("high", "low")}
    layer = experts["low"].blocks[0].attn1.to_q
    results, calls = {}, {}
    for checkpoint in (False, True):
        count = [0]
        handle = layer.register_forward_hook(lambda *_, count=count: count.__setitem__(0, count[0] + 1))
        try:
            results[checkpoint] = propagated_scores(model.pipe, experts, job, get_format("hif4"),
                                                    family=model.family, projections=2, checkpoint=checkpoint)
        finally:
            handle.remove()
        calls[checkpoint] = count[0]
    assert calls[True] > calls[False]
    assert not experts["low"].is_gradient_checkpointing  # left as it was
    for expert in experts:
        for name, (value, _) in results[False][expert].items():
            assert results[True][expert][name][0] == pytest.approx(value, rel=1e-6, abs=1e-12)


def test_checkpointing_keeps_no_layer_error_in_the_graph(tiny):
    """Each layer's dY is a saved tensor of the graph (not a list beside it), so under --checkpoint it is dropped
    and recomputed with the block: what the trajectory's graph saves outside the checkpointed calls is a small
    fraction of what it saves without them."""
    model, job = tiny
    experts = {e: model.family.expert_module(model.pipe, e) for e in ("high", "low")}
    saved = {}
    for checkpoint in (False, True):
        total = [0]

        def pack(tensor, total=total):
            total[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            propagated_scores(model.pipe, experts, job, get_format("hif4"), family=model.family, projections=1,
                              checkpoint=checkpoint)
        saved[checkpoint] = total[0]
    assert saved[True] * 10 < saved[False], saved


def test_the_search_takes_the_memory_options(tiny):
    """plan --search e2e --checkpoint: the same rounds and the same set as without."""
    model, job = tiny
    from sensq.sensitivity.search import search_protected

    found = [search_protected(model, job, get_format("hif4"), 0.2, rounds=2, projections=1, checkpoint=checkpoint)
             for checkpoint in (False, True)]
    assert found[0].chosen == found[1].chosen
    assert found[0].final == pytest.approx(found[1].final, rel=1e-6)
