"""Few-step LoRA students (original Wan / Lightning key format) fused into each expert."""

import pytest
import torch
from safetensors.torch import save_file

from sensq.errors import InputError
from sensq.loading import load_model
from sensq.models.layers import quantizable_layers
from sensq.models.lora import fuse_loras

pytest.importorskip("peft")


def _lightning_style_lora(seed: int) -> dict[str, torch.Tensor]:
    """Keys as in Wan2.2-Lightning's high/low_noise_model.safetensors, sized for the tiny model."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for block in range(2):
        for name, (fan_in, fan_out) in {"self_attn.q": (32, 32), "ffn.2": (64, 32)}.items():
            key = f"diffusion_model.blocks.{block}.{name}"
            lora[f"{key}.lora_down.weight"] = torch.randn(4, fan_in, generator=g) * 0.1
            lora[f"{key}.lora_up.weight"] = torch.randn(fan_out, 4, generator=g) * 0.1
            lora[f"{key}.alpha"] = torch.tensor(8.0)
    return lora


def test_fuse_both_experts(tmp_path):
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    high, low = _lightning_style_lora(1), _lightning_style_lora(2)
    save_file(high, tmp_path / "high.safetensors")
    save_file(low, tmp_path / "low.safetensors")
    q_before = model.pipe.transformer.blocks[0].attn1.to_q.weight.clone()
    ffn_before = model.pipe.transformer_2.blocks[1].ffn.net[2].weight.clone()
    fuse_loras(model, high=str(tmp_path / "high.safetensors"), low=str(tmp_path / "low.safetensors"))
    scale = 8.0 / 4  # alpha / rank
    key = "diffusion_model.blocks.0.self_attn.q"
    expected = q_before + scale * high[f"{key}.lora_up.weight"] @ high[f"{key}.lora_down.weight"]
    torch.testing.assert_close(model.pipe.transformer.blocks[0].attn1.to_q.weight, expected)
    key = "diffusion_model.blocks.1.ffn.2"
    expected = ffn_before + scale * low[f"{key}.lora_up.weight"] @ low[f"{key}.lora_down.weight"]
    torch.testing.assert_close(model.pipe.transformer_2.blocks[1].ffn.net[2].weight, expected)
    # unloaded: plain Linears again, the same inventory as before
    assert type(model.pipe.transformer.blocks[0].attn1.to_q) is torch.nn.Linear
    assert len(quantizable_layers(model.pipe.transformer)) == 27


def test_lora_that_does_not_fit(tmp_path):
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    lora = _lightning_style_lora(1)
    lora["diffusion_model.blocks.0.self_attn.q.lora_down.weight"] = torch.randn(4, 7)
    save_file(lora, tmp_path / "bad.safetensors")
    with pytest.raises(InputError, match="cannot apply LoRA .*bad.safetensors' to the high-noise expert"):
        fuse_loras(model, high=str(tmp_path / "bad.safetensors"))


def test_student_loras_follow_the_probe_through_rank_plan_apply(tmp_path):
    """A probe of the LoRA student records its LoRAs; rank/ablate show them and ask for them (a file never makes
    sensq load a path it names), and the base model (or apply-plan without them) is refused with a hint,
    instead of ranking the teacher's weights silently."""
    import json

    from click.testing import CliRunner

    from sensq.cli import main
    from sensq.store.probe_file import ProbeFile

    for name, seed in (("high", 1), ("low", 2)):
        save_file(_lightning_style_lora(seed), tmp_path / f"{name}.safetensors")
    loras = ["--lora-high", str(tmp_path / "high.safetensors"), "--lora-low", str(tmp_path / "low.safetensors")]
    run = CliRunner().invoke
    probe, ranking, plan = tmp_path / "probe.h5", tmp_path / "ranking.json", tmp_path / "plan.json"
    result = run(main, ["probe", "--limit", "1", "--steps", "2", *loras, "--out", str(probe)])
    assert result.exit_code == 0, result.output
    with ProbeFile(probe) as file:
        assert file.loras == {"high": str((tmp_path / "high.safetensors").resolve()),
                              "low": str((tmp_path / "low.safetensors").resolve())}
        student = file.model_fingerprint
    assert student != load_model("tiny", torch.device("cpu"), torch.float32).fingerprint

    for model in (["--model", "tiny"], []):
        result = run(main, ["rank", str(probe), *model, "--out", str(ranking)])
        assert result.exit_code == 1 and "was made with LoRAs fused; pass them yourself" in result.output
        assert f"--lora-high {tmp_path / 'high.safetensors'}" in result.output
    result = run(main, ["rank", str(probe), *loras, "--out", str(ranking)])  # the model from the probe: embedded
    assert result.exit_code == 0, result.output
    result = run(main, ["rank", str(probe), "--model", "tiny", "--lora-high", str(tmp_path / "low.safetensors"),
                        "--lora-low", str(tmp_path / "high.safetensors"), "--out", str(tmp_path / "swapped.json")])
    assert result.exit_code == 1 and "probed on model" in result.output  # other LoRAs: another fingerprint
    assert json.loads(ranking.read_text())["provenance"]["model_fingerprint"] == student
    assert run(main, ["plan", str(ranking), "--top-k", "1", "--out", str(plan)]).exit_code == 0
    assert json.loads(plan.read_text())["model"]["loras"]["low"].endswith("low.safetensors")

    result = run(main, ["apply-plan", str(plan), "--out", str(tmp_path / "q")])
    assert result.exit_code == 1 and "made with LoRAs high=" in result.output
    result = run(main, ["apply-plan", str(plan), *loras, "--out", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["source_model"]["fingerprint"] == student and manifest["source_model"]["id"] == "tiny"
    assert set(manifest["source_model"]["loras"]) == {"high", "low"}


def test_missing_lora_file_is_one_clear_error(tmp_path):
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    with pytest.raises(InputError, match="LoRA file for the low-noise expert not found: '.*gone.safetensors'"):
        fuse_loras(model, low=str(tmp_path / "gone.safetensors"))


def test_loras_are_refused_on_a_quantized_checkpoint(tmp_path):
    from sensq.plan import Plan, Rule
    from sensq.quant.apply import apply_plan
    from sensq.quant.checkpoint import save_quantized

    model = load_model("tiny", torch.device("cpu"), torch.float32)
    plan = Plan([Rule("re:(high|low):blocks\\..*", "hif4", "hif4"), Rule("re:(high|low):.*", None, None)])
    apply_plan(model, plan)
    save_quantized(model, tmp_path / "q", plan=plan, calibration={})
    quantized = load_model(str(tmp_path / "q"), torch.device("cpu"), torch.float32)
    save_file(_lightning_style_lora(1), tmp_path / "high.safetensors")
    with pytest.raises(InputError, match="is a quantized checkpoint: LoRAs cannot be fused into packed weights"):
        fuse_loras(quantized, high=str(tmp_path / "high.safetensors"))
