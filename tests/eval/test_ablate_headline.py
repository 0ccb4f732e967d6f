"""The ablation headline says so when a fixed set beats sensq's ranked set at (nearly) the same cost."""

import pytest

from sensq.ablate.statistics import aggregate as _aggregate
from sensq.ablate.statistics import headline
from sensq.report.ablation import headline_lines


def _row(name, bits, errors):
    per_item = {str(i): {"latent_nmse": e} for i, e in enumerate(errors)}
    return {"set": name, "effective_bits": bits, "protected_layers": {"high": 1}, "protected_share": {"high": 0.3},
            "weight_bytes": 1e6, "weight_bytes_bf16": 2e6, "real_size": None, **_aggregate(per_item)}


def _result(fixed_errors):
    rows = [_row("none", 4.5, [0.10, 0.11, 0.09, 0.10, 0.12, 0.10]),
            _row("sensq at ModelOpt's budget (33%)", 8.22, [0.050, 0.052, 0.048, 0.051, 0.049, 0.050]),
            _row("ModelOpt Wan recipe", 8.24, fixed_errors)]  # 0.02 bits more: the same budget
    result = {"rows": rows, "prompts": ["a", "b", "c"], "seeds": [0, 1]}
    result["headline"] = headline(result)
    return result


def test_a_better_fixed_set_at_the_same_cost_is_named():
    result = _result([0.020, 0.022, 0.019, 0.021, 0.020, 0.021])
    assert result["headline"]["best_fixed_set"] == "ModelOpt Wan recipe"
    lines = headline_lines(result)
    assert any(line.startswith("**The fixed set ModelOpt Wan recipe does better at the same cost**") for line in lines)
    assert lines[0].startswith("Recommended: **ModelOpt Wan recipe**, a fixed rule")
    assert any("rank with --metric grad-e2e" in line for line in lines)
    assert result["headline"]["per_budget"][0]["verdict"] == "lost"


def test_rows_carry_their_kind_and_a_fixed_set_of_any_name_counts():
    result = _result([0.080, 0.082, 0.079, 0.081, 0.080, 0.081])
    result["rows"][2]["set"], result["rows"][2]["kind"] = "first+last blocks 33%", "fixed"
    assert headline(result)["best_fixed_set"] == "first+last blocks 33%"
    assert headline(result)["per_budget"][0]["verdict"] == "won"


def test_a_worse_fixed_set_reads_as_a_gain():
    result = _result([0.080, 0.082, 0.079, 0.081, 0.080, 0.081])
    line = next(x for x in headline_lines(result) if x.startswith("Gain over the best fixed"))
    assert line.startswith("Gain over the best fixed set that costs no more bits (ModelOpt Wan recipe): 0.03")
    assert "distinguishable from noise" in line


def test_first_and_last_blocks_fit_the_budget_or_are_left_out():
    """The fixed rule 'first and last blocks' protects whole blocks from both ends within the budget; where no
    whole block fits (4 blocks of 23% each, budget 10%), the set is left out instead of measuring 'none' twice."""
    import torch

    from sensq.ablate import edge_blocks_plan
    from sensq.loading import load_model
    from sensq.plan import model_layers, summarize, validate_plan

    model = load_model("tiny-deep-4step", torch.device("cpu"), torch.float32)
    layers = model_layers(model)
    plan = edge_blocks_plan(model, ["high", "low"], 0.2, "hif4")
    kept = {r.match for r in plan.rules if r.weight is None}
    assert kept == {f"re:{e}:blocks\\.{i}\\..*" for e in ("high", "low") for i in (0, 1, 18, 19)}
    share = summarize(validate_plan(plan, layers), layers)["total"]["protected_share"]
    assert 0.15 < share <= 0.2
    small = load_model("tiny-trained-4step", torch.device("cpu"), torch.float32)
    assert all(r.weight is not None for r in edge_blocks_plan(small, ["high", "low"], 0.1, "hif4").rules)


def test_run_ablation_leaves_the_callers_plans_alone_and_records_kinds(tmp_path):
    import torch

    from sensq.ablate import ProtectedSet, SetKind, run_ablation
    from sensq.loading import load_model
    from sensq.plan import Plan, Rule
    from sensq.prompts import load_prompts
    from sensq.trajectory import Trajectory

    model = load_model("tiny", torch.device("cpu"), torch.float32)
    trajectory = Trajectory(steps=2).with_resolution(model.default_resolution)
    plans = [Plan([Rule("re:.*", "hif4", "hif4")]), Plan([Rule("re:(high|low):proj_out", None, None),
                                                          Rule("re:.*", "hif4", "hif4")])]
    sets = [ProtectedSet("none", plans[0], SetKind.NONE), ProtectedSet("mine", plans[1], "plan")]
    result = run_ablation(model, trajectory, load_prompts(None, 1), sets, tmp_path / "abl", fmt="hif4")
    assert [plan.layers for plan in plans] == [[], []] and [plan.summary for plan in plans] == [{}, {}]
    assert [row["kind"] for row in result["rows"]] == ["none", "plan"]
    with pytest.raises(ValueError, match="unknown set kind 'best'"):
        ProtectedSet("x", plans[0], "best")
