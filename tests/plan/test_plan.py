"""Plans: budget and top-k selection, the sensq.plan/1 contract, validation, quantize_ (exports: test_exports)."""

import json

import pytest
import torch
from click.testing import CliRunner

from sensq.cli import main
from sensq.errors import InputError, SensqError
from sensq.loading import load_model
from sensq.models import layer_inventory
from sensq.plan import LayerConfig, LayerInfo, Plan, Rule, StepRange, build_plan, parse_budget, resolve, validate_plan
from sensq.quant import QuantLinear, dequantize_, quantize_
from sensq.sensitivity.ranking import LayerRank, Ranking


def _ranking(entrance_params=10, n=10):
    """Synthetic: per expert an entrance layer, then layers L0..L{n-1}, most sensitive first."""
    experts = {}
    for expert in ("high", "low"):
        layers = [LayerRank("patch_embedding", "conv3d", entrance_params, 64, 8, True, False, {"hif4": 0.1},
                            rank={"hif4": n + 1})]
        order = list(range(n)) if expert == "high" else list(reversed(range(n)))
        for position, i in enumerate(order):
            layers.append(LayerRank(f"blocks.1.l{i}", "linear", 100, 64, 8, False, False, {"hif4": 1.0 - position / n},
                                    rank={"hif4": position + 1}))
        experts[expert] = layers
    return Ranking("mse", "mean", ["hif4"], experts, {}, {}, ["cond"], {"model_id": "x", "model_fingerprint": "f"})


def test_budget_walks_the_ranking_and_experts_differ():
    ranking = _ranking()
    plan = build_plan(ranking, budget=0.25)  # total 1010 params: 252 allowed, entrance 10 + two layers of 100
    assert set(plan.protected("high")) == {"patch_embedding", "blocks.1.l0", "blocks.1.l1"}
    assert set(plan.protected("low")) == {"patch_embedding", "blocks.1.l9", "blocks.1.l8"}
    summary = plan.summary["high"]
    assert summary["protected_share"] == pytest.approx(210 / 1010)
    assert summary["weight_bytes_before"] == 1010 * 2
    assert summary["effective_bits"] == pytest.approx((210 * 16 + 800 * 4.5) / 1010)
    assert plan.summary["total"]["params"] == 2020


def test_top_k_and_no_entrance():
    plan = build_plan(_ranking(), top_k=1, protect_entrance=False)
    assert plan.protected("high") == ["blocks.1.l0"] and plan.protected("low") == ["blocks.1.l9"]
    plan = build_plan(_ranking(), top_k=0)
    assert plan.protected("high") == ["patch_embedding"]


def test_rules_follow_the_contract():
    plan = build_plan(_ranking(), top_k=1, fmt="nvfp4", act_format=None, rank_format="hif4")
    data = plan.to_dict()
    assert data["schema"] == "sensq.plan/1"
    assert data["rules"][0] == {"match": "high:patch_embedding", "weight": None, "activation": None,
                                "why": "entrance"}
    assert {"match": "re:high:.*", "weight": "nvfp4", "activation": None, "why": "everything else"} in data["rules"]
    row = next(r for r in data["layers"] if r["layer"] == "blocks.1.l5" and r["expert"] == "low")
    assert row["weight"] == "nvfp4" and row["activation"] is None


def test_first_match_wins_and_regex():
    layers = [LayerInfo("high", "blocks.3.a", 1, 64), LayerInfo("high", "blocks.30.a", 1, 64),
              LayerInfo("low", "blocks.3.a", 1, 64)]
    rules = [Rule("high:blocks.3.a", None, None), Rule(r"re:high:blocks\.3[0-9]\..*", "int4", "int4"),
             Rule("re:.*", "hif4", "hif4"), Rule("low:nothing", None, None)]
    table, unused = resolve(rules, layers)
    assert [(r.layer, r.weight, r.rule) for r in table] == [
        ("blocks.3.a", None, 0), ("blocks.30.a", "int4", 1), ("blocks.3.a", "hif4", 2)]
    assert unused == [3]
    with pytest.raises(InputError, match=r"1 plan rule\(s\) match no layer of this model: 'low:nothing'"):
        validate_plan(Plan(rules), layers)
    with pytest.raises(InputError, match="no rule of the plan matches high:blocks.3.a"):
        resolve([Rule("low:blocks.3.a", None, None)], layers[:1])
    with pytest.raises(InputError, match=r"regex '\(' is not valid \(RE2 syntax"):
        resolve([Rule("re:(", None, None)], layers)


@pytest.mark.parametrize("text,expected", [("5%", 0.05), ("0.05", 0.05), ("0%", 0.0), ("100%", 1.0)])
def test_budgets(text, expected):
    assert parse_budget(text) == pytest.approx(expected)


@pytest.mark.parametrize("text,message", [("150%", "--budget must be within 0..100%"), ("-1%", "--budget must"),
                                          ("five", "--budget must be a share like 5% or 0.05"),
                                          ("1.5", "--budget '1.5' would mean 150%; write 1.5% or 0.015"),
                                          ("5", "--budget '5' would mean 500%; write 5% or 0.05")])
def test_bad_budgets(text, message):
    with pytest.raises(InputError, match=message):
        parse_budget(text)


def test_bad_plan_requests():
    with pytest.raises(InputError, match="exactly one of --budget and --top-k"):
        build_plan(_ranking())
    with pytest.raises(SensqError, match="unknown format 'fp4'"):
        build_plan(_ranking(), top_k=1, fmt="fp4")
    with pytest.raises(InputError, match="the ranking has no 'int4' scores"):
        build_plan(_ranking(), top_k=1, rank_format="int4")
    ranking = _ranking()
    ranking.experts["high"][1].members = ["blocks.1.l0", "blocks.1.l1"]
    with pytest.raises(InputError, match="does not record its blocks' layers"):
        build_plan(ranking, top_k=1)


def test_entrance_over_budget_is_reported():
    plan = build_plan(_ranking(entrance_params=500), budget=0.05)
    assert plan.protected("high") == ["patch_embedding"]
    assert "more than the 5.0% budget" in plan.source["warnings"][0]


def test_plan_file_round_trip_and_errors(tmp_path):
    plan = build_plan(_ranking(), top_k=2)
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.rules == plan.rules and loaded.protected("low") == plan.protected("low")
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "sensq.plan/1", "rules": [{"match": "high:x",
                                                                                       "weight": "fp5"}]}))
    with pytest.raises(SensqError, match="unknown format 'fp5'"):
        Plan.load(tmp_path / "bad.json")
    (tmp_path / "none.json").write_text(json.dumps({"schema": "sensq.plan/1", "rules": []}))
    with pytest.raises(InputError, match="has no rules"):
        Plan.load(tmp_path / "none.json")
    with pytest.raises(InputError, match="plan file not found"):
        Plan.load(tmp_path / "missing.json")


def test_the_resolved_table_is_typed_and_its_file_form_unchanged(tmp_path):
    """plan.layers holds LayerConfigs; the file keeps the sensq.plan/1 objects (an older file's rows without a
    kind, or with keys sensq does not read, load and are written back as they were); a malformed row is one
    line."""
    layers = [LayerInfo("high", "blocks.0.a", 100, 64, "linear"), LayerInfo("high", "proj_out", 50, 64, "linear")]
    rules = [Rule("high:blocks.0.a", None, None, steps=(0, 1)), Rule("re:high:.*", "hif4", "hif4", calibration="gptq")]
    table, _ = resolve(rules, layers)
    assert all(isinstance(row, LayerConfig) for row in table)
    assert table[0].step_ranges == (StepRange(None, None, steps=(0, 1), rule=0),)
    assert table[0].protected_range() == "steps 0-1" and table[1].protected_range() is None
    assert table[0].to_dict() == {"expert": "high", "layer": "blocks.0.a", "weight": "hif4", "activation": "hif4",
                                  "params": 100, "kind": "linear", "rule": 1, "calibration": "gptq",
                                  "phases": [{"steps": [0, 1], "weight": None, "activation": None, "rule": 0}]}
    assert [LayerConfig.from_dict(row.to_dict()) for row in table] == table
    older = {"expert": "low", "layer": "x", "weight": None, "activation": None, "params": 3, "note": "kept"}
    path = tmp_path / "older.json"
    path.write_text(json.dumps({"schema": "sensq.plan/1", "rules": [{"match": "low:x"}], "layers": [older]}))
    loaded = Plan.load(path)
    assert loaded.layers[0].kind is None and loaded.protected("low") == ["x"]
    loaded.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["layers"] == [older]
    path.write_text(json.dumps({"schema": "sensq.plan/1", "rules": [{"match": "low:x"}],
                                "layers": [{**older, "params": "many"}]}))
    with pytest.raises(InputError, match="a row of its resolved 'layers' table is malformed .'params' must be an "
                                         "integer.; write the plan again"):
        Plan.load(path)


def test_a14b_inventory_for_validation(tmp_path):
    """A folder with the real A14B configs: inventory on the meta device, no weights."""
    from sensq.models.wan import A14B_TRANSFORMER_CONFIG

    for attr in ("transformer", "transformer_2"):
        (tmp_path / attr).mkdir()
        (tmp_path / attr / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel",
                                                                 **A14B_TRANSFORMER_CONFIG}))
    layers = layer_inventory(str(tmp_path))
    assert len([x for x in layers if x.expert == "high"]) == 407
    linear = [x for x in layers if x.expert == "low" and x.name != "patch_embedding"]
    assert sum(x.params for x in linear) == 14_285_690_944


def test_quantize_applies_a_plan_and_undoes_it_exactly():
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    before = {k: v.clone() for k, v in model.pipe.transformer.state_dict().items()}
    kept = model.pipe.transformer.blocks[0].attn1.to_q
    plan = Plan([Rule("high:blocks.0.attn1.to_q", None, None), Rule("re:high:.*", "hif4", "hif4"),
                 Rule("re:low:.*", None, None)])
    table = quantize_(model, plan)
    assert len(table) == 54
    assert model.pipe.transformer.blocks[0].attn1.to_q is kept  # protected: the very same module
    assert isinstance(model.pipe.transformer.blocks[1].attn1.to_q, QuantLinear)
    assert type(model.pipe.transformer_2.blocks[1].attn1.to_q) is torch.nn.Linear
    dequantize_(model)
    assert type(model.pipe.transformer.blocks[1].attn1.to_q) is torch.nn.Linear
    after = model.pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cli_plan_and_validate(tmp_path):
    runner = CliRunner()
    ranking_path = tmp_path / "ranking.json"
    _ranking().save(ranking_path)
    out = tmp_path / "plan.json"
    result = runner.invoke(main, ["plan", str(ranking_path), "--top-k", "1", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["schema"] == "sensq.plan/1"
    bad = runner.invoke(main, ["plan", str(ranking_path), "--budget", "120%"])
    assert bad.exit_code == 1 and "Error: --budget must be within 0..100%, got '120%'" in bad.output
    both = runner.invoke(main, ["plan", str(ranking_path), "--budget", "5%", "--top-k", "2"])
    assert both.exit_code == 1 and "exactly one of --budget and --top-k" in both.output
    # the synthetic plan names layers the tiny model lacks: validation lists them
    invalid = runner.invoke(main, ["plan", "--validate", str(out), "--model", "tiny"])
    assert invalid.exit_code == 1 and "match no layer of this model: 'high:blocks.1.l0'" in invalid.output
    assert runner.invoke(main, ["plan"]).exit_code == 2


def _per_step_ranking():
    """Two layers per expert; at steps 0-1 (the high expert) l_early is the more sensitive, at steps 2-3 (the
    low expert) l_late; over the whole trajectory their order is the other way round in the high expert."""
    experts = {}
    per_step = {"high": {"l_early": [[0.9], [0.1]], "l_late": [[0.2], [0.9]]},
                "low": {"l_early": [[0.1], [0.1]], "l_late": [[0.5], [0.6]]}}
    overall = {"high": {"l_early": 2, "l_late": 1}, "low": {"l_early": 2, "l_late": 1}}
    for expert in ("high", "low"):
        experts[expert] = [LayerRank(f"blocks.1.{name}", "linear", 100, 64, 8, False, False, {"hif4": 0.5},
                                     per_step={"hif4": values}, rank={"hif4": overall[expert][name]})
                           for name, values in per_step[expert].items()]
    return Ranking("mse", "mean", ["hif4"], experts, {"high": [0, 1], "low": [2, 3]}, {}, ["cond"],
                   {"model_id": "x", "model_fingerprint": "f"})


def test_protect_steps_chooses_by_sensitivity_at_those_steps_and_ranges_the_rules():
    ranking = _per_step_ranking()
    plan = build_plan(ranking, top_k=1, protect_entrance=False, protect_steps=(0, 0))
    ranged = [r for r in plan.rules if r.weight is None]
    assert [(r.match, r.steps) for r in ranged] == [("high:blocks.1.l_early", (0, 0))]
    assert "rank 1 at steps 0-0 by mse" in ranged[0].why
    assert plan.source["protect_steps"] == [0, 0]
    assert any("low: runs none of steps 0-0" in w for w in plan.source["warnings"])
    row = next(r for r in plan.layers if r.layer == "blocks.1.l_early" and r.expert == "high")
    assert row.weight == "hif4" and row.step_ranges[0].steps == (0, 0)
    whole = build_plan(ranking, top_k=1, protect_entrance=False)
    assert whole.protected("high") == ["blocks.1.l_late"]
    e2e = Ranking("e2e", "mean", ["hif4"], {e: [LayerRank("blocks.1.x", "linear", 1, 64, 8, False, False,
                                                          {"hif4": 1.0}, rank={"hif4": 1})] for e in ("high",)},
                  {"high": [0]}, {}, ["cond"], {"model_id": "x", "model_fingerprint": "f"})
    with pytest.raises(InputError, match="--protect-steps orders layers by their per-step values"):
        build_plan(e2e, top_k=1, protect_entrance=False, protect_steps=(0, 1))


def test_cli_protect_steps(tmp_path):
    ranking = tmp_path / "r.json"
    _per_step_ranking().save(ranking)
    runner = CliRunner()
    done = runner.invoke(main, ["plan", str(ranking), "--top-k", "1", "--no-protect-entrance", "--protect-steps",
                                "2-3", "--out", str(tmp_path / "p.json")])
    assert done.exit_code == 0, done.output
    assert "and at steps 2-3 only: blocks.1.l_late" in done.output
    last = runner.invoke(main, ["plan", str(ranking), "--top-k", "1", "--no-protect-entrance", "--protect-steps",
                                "last", "--out", str(tmp_path / "l.json")])
    assert last.exit_code == 0 and "and at steps 3-3 only: blocks.1.l_late" in last.output, last.output
    for bad, message in (("3-1", "0 <= A <= B"), ("x", "takes A-B")):
        refused = runner.invoke(main, ["plan", str(ranking), "--top-k", "1", "--protect-steps", bad,
                                       "--out", str(tmp_path / "q.json")])
        assert refused.exit_code == 1 and message in refused.output, refused.output


def test_cli_calibration_is_written_into_the_quantizing_rules(tmp_path):
    ranking = tmp_path / "r.json"
    _ranking().save(ranking)
    done = CliRunner().invoke(main, ["plan", str(ranking), "--top-k", "1", "--calibration", "gptq",
                                     "--out", str(tmp_path / "p.json")])
    assert done.exit_code == 0, done.output
    plan = Plan.load(tmp_path / "p.json")
    assert {r.calibration for r in plan.rules if r.weight} == {"gptq"}
    assert {r.calibration for r in plan.rules if r.weight is None} == {None}
    assert all(row.calibration == ("gptq" if row.weight else None) for row in plan.layers)


@pytest.mark.parametrize("how", ["budget", "tiers"])
def test_a_ranking_with_nan_values_is_refused_in_one_line(tmp_path, how):
    """NaN values cannot be ordered: the plan says how many and which, instead of planning in silence."""
    from sensq.plan.tiers import build_tier_plan

    ranking = _nan_ranking()
    with pytest.raises(InputError, match=r"holds NaN hif4 values for 1 layer\(s\), e\.g\. high:blocks\.0\.b"):
        if how == "budget":
            build_plan(ranking, budget=0.5)
        else:
            build_tier_plan(ranking, ["hif4", None], 8.0)


def _nan_ranking():
    from sensq.sensitivity.ranking import LayerRank, Ranking

    layers = [LayerRank("blocks.0.a", "linear", 100, 10, 10, False, False, {"hif4": 0.5}, rank={"hif4": 1}),
              LayerRank("blocks.0.b", "linear", 100, 10, 10, False, False, {"hif4": float("nan")}, rank={"hif4": 2})]
    return Ranking("mse", "mean", ["hif4"], {"high": layers}, {"high": [0]}, {"high": [1.0]}, ["cond"],
                   {"model_id": "tiny"})
