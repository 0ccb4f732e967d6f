"""Three model families through the same path: Wan2.2-T2V-A14B (two experts), single-expert Wan
(Wan2.1-T2V style) and LTX-Video (not Wan: one expert, batched CFG, its own blocks and schedule).

For each: probe -> rank (local and e2e by block) -> plan -> apply-plan (block-by-block calibration) ->
generate from the checkpoint -> ablate, on tiny in-process models; and the real model's layer inventory
on the meta device."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sensq.cli import main
from sensq.errors import InputError
from sensq.loading import load_model
from sensq.models import FAMILIES, family_of, get_family, layer_inventory
from sensq.models.layers import linear_count_and_params, quantizable_layers
from sensq.probes.recorder import ProbeRequest, run_probe
from sensq.prompts import load_prompts
from sensq.store.probe_file import ProbeFile
from sensq.trajectory import Trajectory

CPU = torch.device("cpu")
CASES = {  # embedded model -> (family, experts, trajectory options)
    "tiny": ("wan2.2-t2v-a14b", ["high", "low"], []),
    "tiny-wan21": ("wan-t2v", ["main"], []),
    "tiny-ltx": ("ltx-video", ["main"], ["--scheduler", "euler"]),
}


@pytest.mark.parametrize("model", list(CASES))
def test_the_whole_chain(model, tmp_path):
    family_name, experts, options = CASES[model]
    runner = CliRunner()
    probe, ranking, e2e = tmp_path / "probe.h5", tmp_path / "ranking.json", tmp_path / "e2e.json"
    sequential = ["--sequential-experts"] if len(experts) > 1 else []
    steps = [
        ["probe", "--model", model, "--limit", "2", "--steps", "3", *options, "--out", str(probe)],
        ["rank", str(probe), "--out", str(ranking)],
        ["rank", str(probe), "--metric", "e2e", "--granularity", "block", "--limit", "1", "--out", str(e2e)],
        ["plan", str(ranking), "--budget", "40%", "--out", str(tmp_path / "plan.json")],
        ["plan", str(e2e), "--top-k", "1", "--no-protect-entrance", "--out", str(tmp_path / "blocks.json")],
        ["plan", str(e2e), "--budget", "60%", "--no-protect-entrance", "--out", str(tmp_path / "blocks-budget.json")],
        ["apply-plan", str(tmp_path / "plan.json"), "--model", model, "--probe", str(probe), "--calibrate", "mse",
         *sequential, "--out", str(tmp_path / "ckpt")],
        ["generate", "--model", str(tmp_path / "ckpt"), "--limit", "1", "--steps", "3", *options, "--no-video",
         "--out", str(tmp_path / "gen")],
        ["ablate", str(ranking), "--top-k", "1", "--budget", "40%", "--seeds", "1", "--limit", "2",
         "--out", str(tmp_path / "ablation")],
    ]
    for args in steps:
        result = runner.invoke(main, args)
        assert result.exit_code == 0, (args[0], result.output, result.exception)

    source = load_model(model, CPU, torch.float32)
    assert source.family.name == family_name and source.family.experts(source.pipe) == experts
    with ProbeFile(probe) as recorded:
        assert recorded.experts == experts
        for expert in experts:  # every quantizable layer was recorded, in both CFG branches
            module = source.family.expert_module(source.pipe, expert)
            assert recorded.layers(expert) == [name for name, _ in quantizable_layers(module)]
            samples = recorded.read(expert, recorded.layers(expert)[-1], "samples")
            assert samples.shape[2] == 2 and np.isfinite(samples).all()
    ranked = json.loads(ranking.read_text())
    assert ranked["provenance"]["family"] == family_name and list(ranked["experts"]) == experts
    blocks = json.loads(e2e.read_text())["experts"][experts[0]]
    assert f"{source.family.blocks}.1" in {layer["name"] for layer in blocks}  # a whole block scored as one
    from sensq.plan import Plan, model_layers, validate_plan

    block_plan = Plan.load(tmp_path / "blocks.json")  # a block ranking planned: the top block's every layer kept
    top = min(blocks, key=lambda layer: layer["rank"]["hif4"])
    assert set(block_plan.protected(experts[0])) == set(top.get("members") or [top["name"]])
    blocks_only = Plan.load(tmp_path / "blocks-budget.json")  # a budget that only a whole block can use
    assert any(len(layer.get("members", [])) > 1 and set(layer["members"]) <= set(blocks_only.protected(experts[0]))
               for layer in blocks)
    assert len(validate_plan(block_plan, model_layers(source))) == len(model_layers(source))
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["family"] == family_name and manifest["experts"] == source.family.expert_attrs
    calibrated = [entry for entry in manifest["layers"].values() if entry["weight"]]
    assert calibrated and all(entry["act_rows"] for entry in calibrated)
    deployed = load_model(str(tmp_path / "ckpt"), CPU, torch.float32)
    assert deployed.family is source.family
    assert any(type(m).__name__ == "PackedLinear" for e in experts
               for m in deployed.family.expert_module(deployed.pipe, e).modules())
    from safetensors.torch import load_file

    latents = [load_file(path)["latents"] for path in (tmp_path / "gen").rglob("*.safetensors")]
    assert latents and all(t.dim() == 5 and torch.isfinite(t).all() for t in latents)  # [B, C, F, H, W] for all
    result = json.loads((tmp_path / "ablation" / "ablation.json").read_text())
    rows = {row["set"]: row for row in result["rows"]}
    assert rows["none"]["metrics"]["latent_nmse"] > 0 and all(math.isfinite(r["metrics"]["latent_nmse"])
                                                               for r in rows.values())
    assert rows["none"]["real_size"]["model"] == source.family.real_model_id


def test_batched_guidance_is_split_into_its_branches(tmp_path):
    """LTX runs cond and uncond in one forward (batch [uncond, cond]): the probe splits it. At the first step
    both branches see the same latents, so proj_in's inputs agree with each other and with a run without
    CFG bit for bit; the caption projection sees the prompt in cond only."""
    model = load_model("tiny-ltx", CPU, torch.float32)
    prompts = load_prompts(None, 1)
    files = {}
    for guidance in (3.0, 1.0):
        trajectory = Trajectory(steps=2, scheduler="euler", guidance=guidance).with_resolution(model.default_resolution)
        files[guidance] = tmp_path / f"g{guidance}.h5"
        run_probe(ProbeRequest(model, trajectory, prompts, ["main"], files[guidance]))
    with ProbeFile(files[3.0]) as cfg, ProbeFile(files[1.0]) as plain:
        assert cfg.branches == ["cond", "uncond"] and plain.branches == ["cond"]
        both = cfg.read("main", "proj_in", "samples")[0, 0]  # [branch, rows, in]
        np.testing.assert_array_equal(both[0], both[1])
        np.testing.assert_array_equal(both[0], plain.read("main", "proj_in", "samples")[0, 0, 0])
        text = cfg.read("main", "caption_projection.linear_1", "samples")[0, 0]
        np.testing.assert_allclose(text[0], plain.read("main", "caption_projection.linear_1", "samples")[0, 0, 0],
                                   rtol=1e-5, atol=1e-6)
        assert not np.allclose(text[0], text[1])
        first = {name: cfg.first_block("main", name).shape for name in ("hidden_states", "rotary_cos",
                                                                           "encoder_attention_mask")}
        assert all(shape[2] == 2 for shape in first.values())  # one per branch


def test_real_layer_inventories_on_the_meta_device():
    """The real models' configs, instantiated without memory: Wan2.2 A14B per expert, Wan2.1-T2V-14B (the
    same architecture) and LTX-Video 2B (28 blocks of 10 Linears, proj_in, 3 timestep and 2 caption Linears,
    proj_out; 1.9 B parameters)."""
    wan = get_family("wan2.2-t2v-a14b").real_expert_on_meta()
    assert linear_count_and_params(wan) == (406, 14_288_491_584)
    assert linear_count_and_params(get_family("wan-t2v").real_expert_on_meta()) == (406, 14_288_491_584)
    ltx = get_family("ltx-video").real_expert_on_meta()
    n_linear, params = linear_count_and_params(ltx)
    assert n_linear == 28 * 10 + 7 and 1.8e9 < params < 2.0e9
    assert len(quantizable_layers(ltx)) == n_linear  # LTX has no patch Conv3d
    assert len(quantizable_layers(wan)) == 407  # the 406 Linears and the patch embedding


def test_a_saved_ltx_folder_loads_as_its_family(tmp_path):
    model = load_model("tiny-ltx", CPU, torch.float32)
    model.pipe.save_pretrained(tmp_path)
    again = load_model(str(tmp_path), CPU, torch.float32)
    assert again.family.name == "ltx-video" and again.fingerprint == model.fingerprint
    inventory = layer_inventory(str(tmp_path))
    assert [layer.name for layer in inventory] == [name for name, _ in quantizable_layers(model.pipe.transformer)]


def test_family_registry_errors():
    with pytest.raises(InputError, match="unknown model family 'sd3'; known: ltx-video, wan2.2-t2v-a14b, wan-t2v"):
        get_family("sd3")

    class OtherPipeline:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(InputError, match="no model family for a OtherPipeline; supported: ltx-video .*wan2.2-t2v-a14b"):
        family_of(OtherPipeline())
    assert set(FAMILIES) == {"wan2.2-t2v-a14b", "wan-t2v", "ltx-video"}


def test_ltx_refuses_what_its_pipeline_cannot_run():
    model = load_model("tiny-ltx", CPU, torch.float32)
    family = model.family
    with pytest.raises(InputError, match="ltx-video runs --scheduler euler, not 'unipc'"):
        family.check_trajectory(Trajectory())
    with pytest.raises(InputError, match="--height must be a multiple of 32 for ltx-video, got 48"):
        family.check_resolution(model.pipe, 48, 32, 9, torch.float32, CPU)
    with pytest.raises(InputError, match="--frames must be 4k\\+1 for this ltx-video model, got 7"):
        family.check_resolution(model.pipe, 32, 32, 7, torch.float32, CPU)
