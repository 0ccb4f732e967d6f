"""The Wan2.2 family, the embedded tiny pipelines, loading from folders and the Hub cache."""

import json

import pytest
import torch

from sensq.errors import InputError
from sensq.loading import load_model
from sensq.models.layers import linear_count_and_params, quantizable_layers
from sensq.models.wan import WAN22_A14B, a14b_expert_on_meta, build_tiny_pipeline

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", CPU, torch.float32)


def test_a14b_inventory_on_meta_device():
    expert = a14b_expert_on_meta()
    assert next(expert.parameters()).device.type == "meta"
    assert linear_count_and_params(expert) == (406, 14_288_491_584)
    layers = [name for name, _ in quantizable_layers(expert)]
    assert len(layers) == 407  # 406 Linears + the patch-embedding Conv3d
    assert layers[0] == "patch_embedding" and layers[-1] == "proj_out"


def test_tiny_has_two_different_experts(tiny):
    high, low = tiny.pipe.transformer, tiny.pipe.transformer_2
    assert type(high).__name__ == "WanTransformer3DModel" and type(low) is type(high)
    assert not torch.equal(high.blocks[0].attn1.to_q.weight, low.blocks[0].attn1.to_q.weight)
    assert tiny.pipe.config.boundary_ratio == 0.875
    assert linear_count_and_params(high)[0] == 6 + 10 * 2


def test_tiny_realshape_has_real_widths():
    pipe = build_tiny_pipeline("tiny-realshape")
    expert = pipe.transformer
    assert expert.config.attention_head_dim == 128 and expert.config.text_dim == 4096
    assert expert.condition_embedder.text_embedder.linear_1.in_features == 4096


def test_routing_and_entrance():
    family = WAN22_A14B
    pipe = build_tiny_pipeline()
    assert family.route(pipe, 875.0) == "high" and family.route(pipe, 874.9) == "low"
    assert family.experts(pipe) == ["high", "low"]
    for name in ("patch_embedding", "condition_embedder.time_proj", "blocks.0.attn1.to_q", "blocks.0.ffn.net.2"):
        assert family.is_entrance(name)
    for name in ("blocks.1.attn1.to_q", "blocks.10.ffn.net.0.proj", "proj_out"):
        assert not family.is_entrance(name)
    assert family.is_exit("proj_out")


def test_saved_folder_loads_offline_with_the_same_fingerprint(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny.pipe.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), CPU, torch.float32)
    assert type(loaded.pipe).__name__ == "WanPipeline"
    assert loaded.pipe.config.boundary_ratio == 0.875
    assert loaded.fingerprint == tiny.fingerprint
    assert loaded.default_resolution == (32, 32, 9)
    bf16 = load_model(str(tmp_path), CPU, torch.bfloat16)
    assert bf16.pipe.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert bf16.pipe.transformer.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32


def test_fingerprint_changes_with_weights(tiny, tmp_path):
    tiny.pipe.save_pretrained(tmp_path)
    other = load_model(str(tmp_path), CPU, torch.float32)
    with torch.no_grad():
        other.pipe.transformer_2.proj_out.weight[0, 0] += 1.0
    from sensq.models import model_fingerprint

    assert model_fingerprint(other.pipe, other.family) != tiny.fingerprint


def test_folder_without_pipeline(tmp_path):
    with pytest.raises(InputError, match="has no model_index.json: not a diffusers pipeline folder"):
        load_model(str(tmp_path), CPU, torch.float32)


def test_folder_with_another_pipeline_class(tmp_path, tiny):
    tiny.pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    del index["transformer_2"]
    index["_class_name"] = "NoSuchPipeline"
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="cannot load the pipeline in"):
        load_model(str(tmp_path), CPU, torch.float32)


def test_hub_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"'Wan-AI/Wan2.2-T2V-A14B-Diffusers' is not in the local Hugging Face cache.*"
                                         r"huggingface-cli download Wan-AI/Wan2.2-T2V-A14B-Diffusers"):
        load_model("Wan-AI/Wan2.2-T2V-A14B-Diffusers", CPU, torch.float32)


def test_unknown_model_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = (r"unknown model 'huge': not an embedded model "
                r"\(tiny, tiny-realshape, small, tiny-wan21, tiny-ltx, tiny-trained, tiny-trained-4step, tiny-deep, "
                r"tiny-deep-4step\)")
    with pytest.raises(InputError, match=expected):
        load_model("huge", CPU, torch.float32)


def test_unfused_lora_layers_are_refused():
    expert = build_tiny_pipeline().transformer
    expert.blocks[0].attn1.to_q.add_module("lora_A", torch.nn.ModuleDict({"x": torch.nn.Linear(2, 2)}))
    with pytest.raises(ValueError, match="unfused LoRA"):
        quantizable_layers(expert)
