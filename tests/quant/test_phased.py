"""Timestep-range rules: a layer's precision follows the pipeline's denoising step."""

import json

import pytest
import torch

from sensq.errors import InputError
from sensq.loading import load_model
from sensq.models.layers import LayerInfo
from sensq.plan import Plan, Rule, resolve, summarize
from sensq.quant.apply import apply_plan, dequantize_
from sensq.quant.checkpoint import save_quantized
from sensq.quant.phased import STEP_CLOCK_ATTR, is_phased
from sensq.trajectory import Trajectory, apply_trajectory, run
from tests.fresh_process import latents_in_a_fresh_process

EVERYTHING = Rule("re:(high|low):.*", "hif4", "hif4")


@pytest.fixture(scope="module")
def tiny():
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    trajectory = Trajectory(steps=4).with_resolution(model.default_resolution)
    apply_trajectory(model.pipe, trajectory)
    return model, trajectory


def _run(model, trajectory, plan=None):
    if plan is not None:
        apply_plan(model, plan)
    try:
        return run(model.pipe, "a red ball moving left", trajectory, seed=3)
    finally:
        dequantize_(model)


def test_rules_with_ranges_validate_and_survive_the_plan_file(tmp_path):
    with pytest.raises(InputError, match="both 'steps' and 'sigma'"):
        Rule("re:high:.*", None, None, steps=[0, 1], sigma=[0.9, 1.0])
    with pytest.raises(InputError, match=r"'sigma' must be \[low, high\]"):
        Rule("re:high:.*", None, None, sigma=[1.0, 0.5])
    with pytest.raises(InputError, match="'steps' must be two step indices"):
        Rule("re:high:.*", None, None, steps=[0.5, 2])
    with pytest.raises(InputError, match=r"'steps' must be \[low, high\]"):
        Rule("re:high:.*", None, None, steps=[0, float("nan")])
    plan = Plan([Rule("re:high:blocks\\.0\\..*", None, None, steps=[0, 1]),
                 Rule("re:low:.*", "fp8_e4m3", "fp8_e4m3", sigma=[0.0, 0.2]), EVERYTHING])
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").rules == plan.rules
    raw = json.loads((tmp_path / "plan.json").read_text())
    assert raw["rules"][0]["steps"] == [0, 1] and raw["rules"][1]["sigma"] == [0.0, 0.2]


def test_resolve_records_the_ranges_before_the_rule_that_decides_the_other_steps():
    layers = [LayerInfo("high", "blocks.0.attn1.to_q", 64 * 64 + 64, 64), LayerInfo("high", "proj_out", 64 * 16, 64)]
    rules = [Rule("re:high:blocks\\.0\\..*", None, None, steps=[0, 1]),
             Rule("re:high:.*", "fp8_e4m3", "fp8_e4m3", steps=[0, 3]), EVERYTHING]
    table, unused = resolve(rules, layers)
    assert unused == []
    assert [p.rule for p in table[0].step_ranges] == [0, 1] and table[0].weight == "hif4"
    assert [p.rule for p in table[1].step_ranges] == [1]
    # resident: a phased layer keeps every distinct weight it runs (BF16 16 + FP8 8.5 + HiF4 4.5 at width 64)
    bits = summarize(table[:1], layers[:1])["total"]["effective_bits"]
    assert bits == pytest.approx(16 + 8 + 32 / 64 + 4.5, abs=1e-9)
    summary = summarize(table, layers)["high"]
    assert summary["protected_share"] == 0 and summary["protected_at_some_steps_share"] == pytest.approx(
        layers[0].params / (layers[0].params + layers[1].params))
    from sensq.report.ablation import kept_text

    row = {"protected_share": {"high": 0.0, "low": 0.1}, "protected_at_some_steps": {"high": 0.25, "low": 0.0}}
    assert kept_text(row, 0) == "0% / 10% (+25% / 0% at some steps)"
    assert kept_text({"protected_share": {"high": 0.5}}, 1) == "50.0%"
    with pytest.raises(InputError, match="matches high:blocks.0.attn1.to_q outside its step ranges"):
        resolve(rules[:2], layers)


def test_the_layer_follows_the_step(tiny):
    model, trajectory = tiny
    full = _run(model, trajectory)
    quantized = _run(model, trajectory, Plan([EVERYTHING]))
    assert not torch.equal(full, quantized)
    every_step = Plan([Rule("re:(high|low):.*", None, None, steps=[0, 3]), EVERYTHING])
    assert torch.equal(_run(model, trajectory, every_step), full)
    never = Plan([Rule("re:(high|low):.*", None, None, steps=[7, 9]), EVERYTHING])
    assert torch.equal(_run(model, trajectory, never), quantized)
    first_two = _run(model, trajectory, Plan([Rule("re:(high|low):.*", None, None, steps=[0, 1]), EVERYTHING]))
    assert not torch.equal(first_two, full) and not torch.equal(first_two, quantized)
    sigmas = model.pipe.scheduler.timesteps.double() / 1000
    by_sigma = Plan([Rule("re:(high|low):.*", None, None, sigma=[float(sigmas[1]) - 1e-6, 1.0]), EVERYTHING])
    assert torch.equal(_run(model, trajectory, by_sigma), first_two)
    assert not hasattr(model.pipe, STEP_CLOCK_ATTR)  # dequantize_ took the clock's hooks away
    assert not any(is_phased(m) for m in model.pipe.transformer.modules())


def test_the_clock_reads_the_timestep_argument_not_a_call_count(tiny):
    """CFG runs two forwards per step, and the step index comes from the scheduler's timesteps."""
    model, trajectory = tiny
    seen = []
    apply_plan(model, Plan([Rule("re:(high|low):blocks\\.1\\.attn1\\.to_q", None, None, steps=[1, 1]), EVERYTHING]))
    try:
        clock = getattr(model.pipe, STEP_CLOCK_ATTR)
        layers = [model.pipe.transformer.blocks[1].attn1.to_q, model.pipe.transformer_2.blocks[1].attn1.to_q]
        handles = [layer.register_forward_pre_hook(lambda m, a: seen.append((clock.step, m.current() is m.base)))
                   for layer in layers]
        run(model.pipe, "a red ball moving left", trajectory, seed=3)
        for handle in handles:
            handle.remove()
    finally:
        dequantize_(model)
    assert [s for s, _ in seen] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [base for _, base in seen] == [True, True, False, False, True, True, True, True]


def test_a_phased_layer_outside_a_pipeline_run_is_an_error(tiny):
    model, _ = tiny
    apply_plan(model, Plan([Rule("re:(high|low):.*", None, None, steps=[0, 0]), EVERYTHING]))
    try:
        layer = model.pipe.transformer.blocks[1].attn1.to_q
        with pytest.raises(RuntimeError, match="ran outside a pipeline call"):
            layer(torch.randn(2, layer.weight_shape[1]))
    finally:
        dequantize_(model)


def test_checkpoint_loads_in_a_fresh_process_bit_identical(tiny, tmp_path):
    model, trajectory = tiny
    plan = Plan([Rule("re:high:blocks\\.0\\..*", None, None, steps=[0, 0]),
                 Rule("re:low:.*", "fp8_e4m3", "fp8_e4m3", sigma=[0.0, 0.5]), EVERYTHING])
    _, calibration = apply_plan(model, plan)
    try:
        expected = run(model.pipe, "a red ball moving left", trajectory, seed=3)
        manifest = save_quantized(model, tmp_path / "ckpt", plan=plan, calibration=calibration)
    finally:
        dequantize_(model)
    assert manifest["layers"]["high:blocks.0.attn1.to_q"]["phases"] == [
        {"steps": [0, 0], "weight": None, "activation": None}]
    _, calibration = apply_plan(model, Plan([EVERYTHING]))  # the same HiF4 weights without ranges
    try:
        plain = save_quantized(model, tmp_path / "plain", plan=Plan([EVERYTHING]), calibration=calibration)
    finally:
        dequantize_(model)
    for key in ("quantized_params", "quantized_weight_bytes", "effective_bits_quantized"):  # packed bases counted
        assert manifest["sizes"][key] == plain["sizes"][key], key
    done = latents_in_a_fresh_process(tmp_path / "ckpt", trajectory, expected, tmp_path, "a red ball moving left", 3)
    assert done.returncode == 0, done.stderr[-2000:]


def test_malformed_ranges_in_a_checkpoint_are_one_error_line(tiny, tmp_path):
    from sensq.quant.checkpoint import load_quantized

    model, _ = tiny
    plan = Plan([Rule("re:high:blocks\\.0\\..*", None, None, steps=[0, 0]), EVERYTHING])
    _, calibration = apply_plan(model, plan)
    try:
        save_quantized(model, tmp_path / "ckpt", plan=plan, calibration=calibration)
    finally:
        dequantize_(model)
    path = tmp_path / "ckpt" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["layers"]["high:blocks.0.attn1.to_q"]["phases"] = [{"steps": [3, 1], "weight": None, "activation": None}]
    path.write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"blocks.0.attn1.to_q has malformed step ranges .*'steps' must be"):
        load_quantized(tmp_path / "ckpt")


def test_exports_refuse_plans_with_ranges(tiny):
    from sensq.plan import model_layers, validate_plan
    from sensq.plan.exports import build_export

    model, _ = tiny
    plan = Plan([Rule("re:high:blocks\\.0\\..*", None, None, steps=[0, 0]), EVERYTHING],
                model={"family": model.family.name})
    plan.layers = validate_plan(plan, model_layers(model))
    with pytest.raises(InputError, match="changes .* with the denoising step"):
        build_export(plan, "torchao")


def test_gptq_codes_with_ranges_are_checkpointed_exactly(tiny, tmp_path):
    """A phased layer's base keeps GPTQ's codes in the checkpoint (packed, beside the full-precision weight its
    BF16 step needs): a fresh process generates the in-memory latents bit for bit."""
    from sensq.probes.recorder import ProbeRequest, run_probe
    from sensq.prompts import load_prompts
    from sensq.quant.deployed import PackedLinear

    model, trajectory = tiny
    plan = Plan([Rule("re:(high|low):.*", None, None, steps=[3, 3]),
                 Rule("re:(high|low):.*", "hif4", "hif4", calibration="gptq")])
    probe = tmp_path / "probe.h5"
    run_probe(ProbeRequest(model, trajectory, load_prompts(None, 1), ["high", "low"], probe))
    _, calibration = apply_plan(model, plan, probe_path=probe)
    try:
        expected = run(model.pipe, "a red ball moving left", trajectory, seed=3)
        assert model.pipe.transformer.blocks[1].attn1.to_q.base.weight_packed is not None
        save_quantized(model, tmp_path / "ckpt", plan=plan, calibration=calibration)
    finally:
        dequantize_(model)
    from sensq.quant.checkpoint import load_quantized

    loaded = load_quantized(tmp_path / "ckpt")
    layer = loaded.pipe.transformer.blocks[1].attn1.to_q
    assert is_phased(layer) and isinstance(layer.base, PackedLinear)
    assert type(layer.variants[0]) is torch.nn.Linear and layer.variants[0].bias is layer.base.bias
    done = latents_in_a_fresh_process(tmp_path / "ckpt", trajectory, expected, tmp_path, "a red ball moving left", 3)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_range_no_step_reaches_is_named_once(tiny):
    """A rule whose step or sigma range the trajectory never reaches decides nothing: dead_ranges names each such
    range once (not once per layer), and a live range is not named."""
    from sensq.quant.phased import dead_ranges
    from sensq.trajectory import plan_steps

    model, trajectory = tiny
    timesteps = [step.timestep for step in plan_steps(model.pipe, model.family, trajectory)]
    plan = Plan([Rule("re:high:blocks\\.0\\..*", None, None, steps=[7, 9]),
                 Rule("re:low:proj_out", None, None, sigma=[1.5, 2.0]),
                 Rule("re:low:blocks\\.0\\..*", None, None, steps=[3, 5]), EVERYTHING])
    apply_plan(model, plan)
    try:
        lines = dead_ranges(model.pipe, model.family, timesteps)
    finally:
        dequantize_(model)
    assert len(lines) == 2, lines
    assert "steps 7-9" in lines[0] and "4-step trajectory" in lines[0] and "high:blocks.0." in lines[0]
    assert "sigma 1.5-2.0" in lines[1] and "(1 layers, e.g. low:proj_out)" in lines[1]


def test_generate_warns_of_a_dead_range(workspace, tmp_path):
    from click.testing import CliRunner

    from sensq.cli import main

    plan = json.loads((workspace / "plan.json").read_text())
    plan["rules"][0]["steps"] = [9, 12]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    result = CliRunner().invoke(main, ["generate", "--plan", str(tmp_path / "plan.json"), "--limit", "1", "--steps",
                                       "3", "--no-video", "--out", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "steps 9-12" in warnings[0] and "3-step trajectory" in warnings[0], result.stderr
