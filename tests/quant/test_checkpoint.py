"""apply-plan: calibration, packed checkpoints that load back bit-identically, sizes, bad input."""

import json

import pytest
import torch
from click.testing import CliRunner

from sensq import workflows
from sensq.cli import main
from sensq.errors import InputError
from sensq.loading import load_model
from sensq.plan import LayerConfig, Plan, Rule
from sensq.probes.capture import ProbeConfig
from sensq.probes.recorder import ProbeRequest, run_probe
from sensq.prompts import load_prompts
from sensq.quant import QuantLinear
from sensq.quant.apply import apply_plan, dequantize_
from sensq.quant.checkpoint import load_quantized, read_manifest, save_quantized
from sensq.trajectory import Trajectory, apply_trajectory, run
from tests.fresh_process import latents_in_a_fresh_process

ENTRANCE = r"re:(high|low):(patch_embedding|condition_embedder\..*|blocks\.0\..*)"
PLAN = Plan([Rule(ENTRANCE, None, None), Rule("re:high:.*", "hif4", "hif4"), Rule("re:low:.*", "nvfp4", "nvfp4")])


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("apply")
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    trajectory = Trajectory(steps=4).with_resolution(model.default_resolution)
    run_probe(ProbeRequest(model, trajectory, load_prompts(None, 2), ["high", "low"], folder / "probe.h5"))
    run_probe(ProbeRequest(model, trajectory, load_prompts(None, 1), ["high", "low"], folder / "nofirst.h5",
                           config=ProbeConfig(first_block_inputs=False)))
    return folder, trajectory


def _latents(model, trajectory):
    apply_trajectory(model.pipe, trajectory)
    return run(model.pipe, "a red ball moving left", trajectory, seed=7)


@pytest.mark.parametrize("calibrate", ["none", "mse", "gptq", "rotate", "rotate-gptq"])
def test_save_load_in_a_fresh_process_is_bit_identical(probed, calibrate, tmp_path):
    folder, trajectory = probed
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    _, calibration = apply_plan(model, PLAN, probe_path=folder / "probe.h5", calibrate=calibrate)
    assert isinstance(model.pipe.transformer.blocks[1].attn1.to_q, QuantLinear)
    assert type(model.pipe.transformer.blocks[0].attn1.to_q) is torch.nn.Linear  # protected: untouched
    expected = _latents(model, trajectory)
    manifest = save_quantized(model, tmp_path / "ckpt", plan=PLAN, calibration=calibration)
    assert manifest["packed"] and manifest["layers"]["high:blocks.1.attn1.to_q"]["weight"] == "hif4"
    done = latents_in_a_fresh_process(tmp_path / "ckpt", trajectory, expected, tmp_path, "a red ball moving left", 7)
    assert done.returncode == 0, done.stderr[-2000:]


def test_mse_calibration_clips_only_when_it_helps(probed):
    folder, _ = probed
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    _, calibration = apply_plan(model, PLAN, probe_path=folder / "probe.h5", calibrate="mse")
    for expert in ("high", "low"):
        layers = calibration[expert]
        assert set(layers) == {n for n in layers if not n.startswith(("blocks.0.", "condition_embedder", "patch"))}
        for calib in layers.values():
            assert 0.5 <= calib.act_clip <= 1.0 and 0.5 <= calib.weight_clip <= 1.0
            assert calib.act_rows > 0 and calib.act_nmse is not None


def test_a_rules_calibration_field_applies_to_its_layers_only(probed, tmp_path):
    """GPTQ for one block of the high expert (by its rule), the format's own rounding elsewhere; the manifest
    says which layer got what, and the checkpoint keeps GPTQ's codes (not a re-encoding)."""
    from sensq.formats import quantize_dequantize, unpack

    folder, trajectory = probed
    plan = Plan([Rule(ENTRANCE, None, None), Rule(r"re:high:blocks\.1\..*", "hif4", "hif4", calibration="gptq"),
                 *PLAN.rules[1:]])
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    with pytest.raises(InputError, match="the plan's 'calibration' rules need --probe"):
        apply_plan(load_model("tiny", torch.device("cpu"), torch.float32), plan)
    table, calibration = apply_plan(model, plan, probe_path=folder / "probe.h5")
    assert {row.layer for row in table if row.calibration == "gptq"} == {
        n for n in calibration["high"] if n.startswith("blocks.1.")}
    gptq_layer = model.pipe.transformer.blocks[1].attn1.to_q
    assert gptq_layer.weight_packed is not None and model.pipe.transformer_2.blocks[1].attn1.to_q.weight_packed is None
    assert not torch.equal(gptq_layer.weight_q, quantize_dequantize(gptq_layer.weight, "hif4"))
    assert torch.equal(gptq_layer.weight_q, unpack(gptq_layer.weight_packed))
    manifest = save_quantized(model, tmp_path / "ckpt", plan=plan, calibration=calibration)
    assert manifest["layers"]["high:blocks.1.attn1.to_q"]["calibration"] == "gptq"
    assert manifest["layers"]["low:blocks.1.attn1.to_q"]["calibration"] == "none"
    loaded = load_quantized(tmp_path / "ckpt")
    assert torch.equal(loaded.pipe.transformer.blocks[1].attn1.to_q.decoded_weight(), gptq_layer.weight_q)
    with pytest.raises(InputError, match="unknown calibration 'smooth'"):
        Rule("re:high:.*", "hif4", "hif4", calibration="smooth")


def test_mse_calibration_keeps_its_clip_curves(probed, tmp_path):
    folder, _ = probed
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    _, calibration = apply_plan(model, PLAN, probe_path=folder / "probe.h5", calibrate="mse")
    manifest = save_quantized(model, tmp_path / "ckpt", plan=PLAN, calibration=calibration)
    entry = manifest["layers"]["high:blocks.1.ffn.net.0.proj"]
    curve = dict(map(tuple, entry["weight_clip_curve"]))
    assert entry["calibration"] == "mse" and curve[1.0] >= curve[entry["weight_clip"]] == min(curve.values())
    assert len(entry["act_clip_curve"]) == len(curve)


def test_sequential_experts_reprobes_the_low_expert(probed):
    folder, _ = probed
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    _, calibration = workflows.apply_plan(model, PLAN, probe_path=folder / "probe.h5", calibrate="mse",
                                          sequential_experts=True)
    assert calibration["low"] and all(c.act_rows > 0 for c in calibration["low"].values())
    dequantize_(model)
    _, plain = apply_plan(model, PLAN, probe_path=folder / "probe.h5", calibrate="mse")
    # the high expert is calibrated on the probe either way; the low one on inputs re-probed behind the
    # quantized high expert, so what it saw differs (a flag that was ignored would give the same numbers)
    assert all(calibration["high"][k].act_nmse == plain["high"][k].act_nmse for k in plain["high"])
    assert any(calibration["low"][k].act_nmse != plain["low"][k].act_nmse for k in plain["low"])


def test_fake_checkpoint_gives_the_same_outputs(probed, tmp_path):
    _, trajectory = probed
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    _, calibration = apply_plan(model, PLAN)
    expected = _latents(model, trajectory)
    manifest = save_quantized(model, tmp_path / "fake", plan=PLAN, calibration=calibration, fake=True)
    assert not manifest["packed"]
    assert torch.equal(_latents(load_quantized(tmp_path / "fake"), trajectory), expected)


def test_a_loaded_checkpoint_computes_its_full_precision_layers_as_the_model_does(probed, tmp_path):
    """Every tensor of a loaded checkpoint sits in the allocator's aligned memory: MKL rounds a GEMM with a
    misaligned operand differently (1 ulp), so a full-precision layer read at the file's offset differed from
    the same layer in memory (found through a plan that quantizes the condition embedder)."""
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    plan = Plan([Rule("re:(high|low):condition_embedder\\.time_proj", "hif4", "hif4"),
                 Rule("re:(high|low):.*", None, None)])
    _, calibration = apply_plan(model, plan)
    save_quantized(model, tmp_path / "ckpt", plan=plan, calibration=calibration)
    loaded = load_quantized(tmp_path / "ckpt")
    for name, tensor in [*loaded.pipe.transformer.named_parameters(), *loaded.pipe.transformer.named_buffers()]:
        assert tensor.data_ptr() % 64 == 0, name
    layer = loaded.pipe.transformer.condition_embedder.time_embedder.linear_1
    x = torch.randn(1, layer.in_features, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer(x), model.pipe.transformer.condition_embedder.time_embedder.linear_1(x))


def test_checkpoint_loads_as_deployed_layers_without_dense_weights(probed, tmp_path):
    """A quantized layer of a loaded checkpoint holds only its packed weight; probing sees every layer."""
    from sensq.models.layers import quantizable_layers
    from sensq.plan import model_layers
    from sensq.quant.deployed import PackedLinear, PackedPatchConv3d

    model = load_model("tiny", torch.device("cpu"), torch.float32)
    before = model_layers(model)
    plan = Plan([Rule("re:high:blocks\\.0\\..*", None, None), Rule("re:(high|low):.*", "hif4", "hif4")])
    _, calibration = apply_plan(model, plan)
    save_quantized(model, tmp_path / "ckpt", plan=plan, calibration=calibration)
    loaded = load_quantized(tmp_path / "ckpt")
    high, low = loaded.pipe.transformer, loaded.pipe.transformer_2
    assert isinstance(high.blocks[1].attn1.to_q, PackedLinear) and isinstance(low.patch_embedding, PackedPatchConv3d)
    assert type(high.blocks[0].attn1.to_q) is torch.nn.Linear  # protected: dense, untouched
    state = high.state_dict()
    assert "blocks.1.attn1.to_q.weight" not in state and "blocks.1.attn1.to_q.packed_blocks" in state
    assert not hasattr(high.blocks[1].attn1.to_q, "weight")
    assert [(i.expert, i.name, i.params, i.in_features) for i in model_layers(loaded)] == \
        [(i.expert, i.name, i.params, i.in_features) for i in before]
    assert len(quantizable_layers(low)) == len(quantizable_layers(model.pipe.transformer_2))
    from sensq.probes.recorder import ProbeRequest, run_probe
    from sensq.store.probe_file import ProbeFile

    trajectory = Trajectory(steps=2).with_resolution(loaded.default_resolution)
    for source, path in ((model, tmp_path / "fp.h5"), (loaded, tmp_path / "ckpt.h5")):
        run_probe(ProbeRequest(source, trajectory, load_prompts(None, 1), ["high"], path))
    with ProbeFile(tmp_path / "fp.h5") as fp, ProbeFile(tmp_path / "ckpt.h5") as deployed:
        for name in ("blocks.1.attn1.to_q", "patch_embedding"):  # the probe counts a packed layer's weight too
            assert deployed.layer_attrs("high", name)["params"] == fp.layer_attrs("high", name)["params"]
            assert deployed.layer_attrs("high", name)["out_features"] == fp.layer_attrs("high", name)["out_features"]


def test_group_size_survives_the_checkpoint(probed, tmp_path):
    """int4@16 (not int4's registry group of 32) is what the checkpoint records, packs and loads."""
    _, trajectory = probed
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    plan = Plan([Rule("re:high:.*", "int4@16", None), Rule("re:low:.*", "int4@channel", "fp8_e4m3")])
    _, calibration = apply_plan(model, plan)
    assert model.pipe.transformer.blocks[1].ffn.net[2].weight_format.identity == "int4@16"
    expected = _latents(model, trajectory)
    manifest = save_quantized(model, tmp_path / "ckpt", plan=plan, calibration=calibration)
    assert manifest["layers"]["high:blocks.1.attn1.to_q"]["weight"] == "int4@16"
    assert manifest["layers"]["low:blocks.1.attn1.to_q"]["weight"] == "int4@channel"
    loaded = load_quantized(tmp_path / "ckpt")
    assert loaded.pipe.transformer.blocks[1].attn1.to_q.weight_format.block_size == 16
    assert loaded.pipe.transformer_2.blocks[1].attn1.to_q.weight_format.block_size is None
    assert torch.equal(_latents(loaded, trajectory), expected)


def test_manifest_that_contradicts_the_packed_header_is_refused(probed, tmp_path):
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    _, calibration = apply_plan(model, PLAN)
    save_quantized(model, tmp_path / "ckpt", plan=PLAN, calibration=calibration)
    manifest_path = tmp_path / "ckpt" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["layers"]["high:blocks.1.attn1.to_q"]["weight"] = "nvfp4"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="high:blocks.1.attn1.to_q is packed as hif4 but the manifest says nvfp4"):
        load_quantized(tmp_path / "ckpt")
    del manifest["layers"]["high:blocks.1.attn1.to_q"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="high:blocks.1.attn1.to_q is packed but the manifest does not list it"):
        load_quantized(tmp_path / "ckpt")


def test_hif4_checkpoint_is_4_5_bits_per_parameter_at_real_widths(tmp_path):
    """tiny-realshape: every in_features is a multiple of 64, so no tail padding."""
    model = load_model("tiny-realshape", torch.device("cpu"), torch.float32)
    plan = Plan([Rule("re:(high|low):.*", "hif4", "hif4")])
    _, calibration = apply_plan(model, plan)
    sizes = save_quantized(model, tmp_path / "ckpt", plan=plan, calibration=calibration)["sizes"]
    assert sizes["effective_bits_quantized"] == 4.5
    assert sizes["quantized_weight_bytes"] * 8 == 4.5 * sizes["quantized_params"]


def test_corrupted_truncated_and_newer_checkpoints(probed, tmp_path):
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    _, calibration = apply_plan(model, PLAN)
    save_quantized(model, tmp_path / "ckpt", plan=PLAN, calibration=calibration)
    weights = tmp_path / "ckpt" / "transformer" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="is corrupted or truncated \\(SHA-256 mismatch\\)"):
        load_quantized(tmp_path / "ckpt")
    weights.write_bytes(bytes(data[:-100]))
    with pytest.raises(InputError, match="is corrupted or truncated"):
        read_manifest(tmp_path / "ckpt")
    manifest_path = tmp_path / "ckpt" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "schema": "sensq.checkpoint/2", "version": 2}))
    with pytest.raises(InputError, match="was written by a newer sensq"):
        read_manifest(tmp_path / "ckpt")
    manifest_path.unlink()
    with pytest.raises(InputError, match="is not a sensq checkpoint \\(no manifest.json\\)"):
        read_manifest(tmp_path / "ckpt")


def test_bad_apply_requests(probed):
    folder, _ = probed
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    foreign = Plan(PLAN.rules, model={"id": "other", "fingerprint": "0" * 16})
    with pytest.raises(InputError, match="the plan was made for model fingerprint 0000000000000000"):
        apply_plan(model, foreign)
    with pytest.raises(InputError, match="match no layer of this model: 'high:blocks.7.attn1.to_q'"):
        apply_plan(model, Plan([Rule("high:blocks.7.attn1.to_q", None, None)] + PLAN.rules))
    with pytest.raises(InputError, match="--calibrate mse needs --probe"):
        apply_plan(model, PLAN, calibrate="mse")
    with pytest.raises(InputError, match="needs the inputs of blocks.0: probe without --no-first-block"):
        apply_plan(load_model("tiny", torch.device("cpu"), torch.float32), PLAN, probe_path=folder / "nofirst.h5",
                   calibrate="mse")


def test_cli_apply_plan(probed, tmp_path):
    folder, _ = probed
    plan_path = tmp_path / "plan.json"
    PLAN.save(plan_path)
    runner = CliRunner()
    result = runner.invoke(main, ["apply-plan", str(plan_path), "--probe", str(folder / "probe.h5"), "--calibrate",
                                  "mse", "--out", str(tmp_path / "q"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["packed"] and summary["layers_quantized"] == 22 and summary["calibration"]["high"]["layers"] == 11
    probe_again = runner.invoke(main, ["probe", "--model", str(tmp_path / "q"), "--limit", "1", "--steps", "2",
                                       "--out", str(tmp_path / "after.h5")])
    assert probe_again.exit_code == 0, probe_again.output
    missing = runner.invoke(main, ["apply-plan", str(tmp_path / "none.json")])
    assert missing.exit_code == 1 and "plan file not found" in missing.output


def test_quantized_pipeline_stays_a_diffusers_pipeline(tmp_path):
    """save_pretrained writes the full-precision weights under the usual keys; a plain WanPipeline loads them;
    diffusers hooks attach to the quantized layers."""
    from diffusers import WanPipeline
    from diffusers.hooks import HookRegistry, ModelHook

    model = load_model("tiny", torch.device("cpu"), torch.float32)
    reference = {k: v.clone() for k, v in model.pipe.transformer.state_dict().items()}
    apply_plan(model, PLAN)
    seen = []

    class Count(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            seen.append(type(module).__name__)
            return args, kwargs

    HookRegistry.check_if_exists_or_initialize(model.pipe.transformer.blocks[1].attn1.to_q).register_hook(Count(), "c")
    trajectory = Trajectory(steps=2, guidance=1.0).with_resolution(model.default_resolution)
    _latents(model, trajectory)
    assert seen and seen[0] == "QuantLinear"
    model.pipe.save_pretrained(tmp_path)
    plain = WanPipeline.from_pretrained(tmp_path)
    assert all(torch.equal(reference[k], v) for k, v in plain.transformer.state_dict().items())


def test_calibration_under_group_offloading_gives_the_same_model(probed):
    """diffusers group offloading (block level) around the block-by-block calibration: same factors,
    same outputs (on the CPU the onload and offload devices coincide, so this checks the hooks, not memory)."""
    folder, trajectory = probed
    plain = load_model("tiny", torch.device("cpu"), torch.float32)
    _, expected = apply_plan(plain, PLAN, probe_path=folder / "probe.h5", calibrate="mse")
    offloaded = load_model("tiny", torch.device("cpu"), torch.float32)
    _, got = apply_plan(offloaded, PLAN, probe_path=folder / "probe.h5", calibrate="mse", offload=True)
    assert {e: {n: (c.weight_clip, c.act_clip) for n, c in v.items()} for e, v in got.items()} == \
           {e: {n: (c.weight_clip, c.act_clip) for n, c in v.items()} for e, v in expected.items()}
    assert torch.equal(_latents(offloaded, trajectory), _latents(plain, trajectory))


def test_a_bf16_checkpoint_loads_as_bf16(tmp_path):
    """diffusers keeps a bf16 Wan expert's time embedder and norms in float32: the checkpoint's dtype is
    that of most of its weights, so --dtype bf16 loads a bf16 checkpoint (it was refused as float32)."""
    load_model("tiny", torch.device("cpu"), torch.float32).pipe.save_pretrained(tmp_path / "source")
    model = load_model(str(tmp_path / "source"), torch.device("cpu"), torch.bfloat16)  # keeps some fp32 parts
    assert {p.dtype for p in model.pipe.transformer.parameters()} == {torch.bfloat16, torch.float32}
    _, calibration = apply_plan(model, PLAN)
    save_quantized(model, tmp_path / "ckpt", plan=PLAN, calibration=calibration)
    loaded = load_quantized(tmp_path / "ckpt", torch.device("cpu"), torch.bfloat16)
    assert loaded.pipe.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    with pytest.raises(InputError, match="holds torch.bfloat16 weights"):
        load_quantized(tmp_path / "ckpt", torch.device("cpu"), torch.float32)


def test_calibrating_a_student_on_its_teachers_probe_is_explicit_and_recorded(tmp_path):
    """The study calibrates the 4-step student on the teacher's trajectory: refused by default, allowed with
    --probe-from-another-model, and the manifest says which model and trajectory the inputs came from."""
    runner = CliRunner()
    probe = tmp_path / "teacher.h5"
    done = runner.invoke(main, ["probe", "--model", "tiny-trained", "--limit", "1", "--steps", "6", "--out",
                                str(probe)])
    assert done.exit_code == 0, done.output
    plan = tmp_path / "plan.json"
    Plan([Rule("re:(high|low):.*", "hif4", "hif4")]).save(plan)
    args = ["apply-plan", str(plan), "--model", "tiny-trained-4step", "--probe", str(probe), "--calibrate", "mse",
            "--out", str(tmp_path / "q")]
    refused = runner.invoke(main, args)
    assert refused.exit_code == 1 and "pass --probe-from-another-model" in refused.output
    assert not (tmp_path / "q").exists()
    applied = runner.invoke(main, args + ["--probe-from-another-model"])
    assert applied.exit_code == 0, applied.output
    assert "calibrated on inputs of another model: tiny-trained" in applied.output
    source = read_manifest(tmp_path / "q")["calibration"]
    assert source["default"] == "mse" and source["probe"]["another_model"] is True
    assert source["probe"]["model_id"] == "tiny-trained" and source["probe"]["trajectory"]["steps"] == 6


def test_pooled_experts_calibrate_on_every_experts_inputs(probed, tmp_path):
    """--pooled-experts: each expert's layers see the rows of both experts (more rows than its own, and another
    choice of clip somewhere); refused with --sequential-experts; recorded in the manifest."""
    folder, _ = probed
    own_model = load_model("tiny", torch.device("cpu"), torch.float32)
    _, own = apply_plan(own_model, PLAN, probe_path=folder / "probe.h5", calibrate="mse")
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    _, pooled = apply_plan(model, PLAN, probe_path=folder / "probe.h5", calibrate="mse", pooled_experts=True)
    for expert in ("high", "low"):
        assert all(pooled[expert][n].act_rows >= own[expert][n].act_rows for n in own[expert])
        assert any(pooled[expert][n].act_rows > own[expert][n].act_rows for n in own[expert])
    assert any(pooled[e][n].act_nmse != own[e][n].act_nmse for e in own for n in own[e])
    with pytest.raises(InputError, match="--pooled-experts and --sequential-experts exclude each other"):
        workflows.apply_plan(load_model("tiny", torch.device("cpu"), torch.float32), PLAN,
                             probe_path=folder / "probe.h5", calibrate="mse", pooled_experts=True,
                             sequential_experts=True)
    result = CliRunner().invoke(main, ["apply-plan", str(_saved(PLAN, tmp_path)), "--probe", str(folder / "probe.h5"),
                                       "--calibrate", "mse", "--pooled-experts", "--out", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "q")["calibration"]["pooled_experts"] is True


def _saved(plan, tmp_path):
    plan.save(tmp_path / "plan.json")
    return tmp_path / "plan.json"


def test_a_calibration_method_is_one_registration(probed):
    """A method that clips weights by MSE and leaves activations to the format's rule: registered, it is a
    choice of plan rules and apply-plan, needs a probe, and the layers record it."""
    from sensq.plan import calibrations
    from sensq.quant.calibrate import method_of

    folder, _ = probed
    calibrations.register_calibration(calibrations.Calibration("mse-weights", "mse", "none", help="weights only"))
    try:
        assert calibrations.METHODS["mse-weights"].needs_data
        assert method_of(LayerConfig("high", "x", "hif4", "hif4"), "mse-weights") == "mse-weights"
        model = load_model("tiny", torch.device("cpu"), torch.float32)
        _, calibration = apply_plan(model, PLAN, probe_path=folder / "probe.h5", calibrate="mse-weights")
        layers = [c for expert in calibration.values() for c in expert.values()]
        assert layers and all(c.method == "mse-weights" for c in layers)
        assert all(c.weight_curve is not None and c.act_curve is None for c in layers)
        dequantize_(model)
    finally:
        del calibrations.METHODS["mse-weights"]


def test_a_manifest_layer_is_a_typed_config_and_round_trips():
    """A manifest's layer entry reads as a ManifestLayer: the LayerConfig it was deployed with (formats, step ranges)
    and its calibration's clips and rotation; written back it is the same entry."""
    from sensq.plan import StepRange
    from sensq.quant.checkpoint import ManifestLayer

    entry = {"weight": "hif4", "activation": "hif4", "weight_clip": 0.9, "act_clip": 1.0, "rotation": 64,
             "phases": [{"steps": [0, 1], "weight": None, "activation": None}]}
    layer = ManifestLayer.from_entry("high:blocks.1.attn1.to_q", entry, "checkpoint 'x'")
    assert layer.config == LayerConfig("high", "blocks.1.attn1.to_q", "hif4", "hif4",
                                       step_ranges=(StepRange(None, None, steps=(0, 1)),))
    assert (layer.weight_clip, layer.act_clip, layer.rotation) == (0.9, 1.0, 64)
    assert layer.to_entry() == entry
    with pytest.raises(InputError, match=r"checkpoint 'x': high:blocks.1.attn1.to_q has malformed step ranges"):
        ManifestLayer.from_entry("high:blocks.1.attn1.to_q", {**entry, "phases": [{"weight": None}]}, "checkpoint 'x'")
