"""The whole chain with ``--device cuda`` on a CUDA device that runs on the CPU (tests/fake_cuda.py): any place
where samples, model and outputs are on different devices raises here as it would on a GPU. Not covered:
``apply-plan --offload`` (diffusers' group offloading assigns ``param.data``, which a wrapper tensor cannot take)."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from sensq.cli import main
from sensq.formats import get_format
from sensq.sensitivity.local import layer_scores
from tests.fake_cuda import FakeCudaTensor, fake_cuda


def test_harness_raises_on_mixing_and_runs_the_numerics(monkeypatch):
    with fake_cuda(monkeypatch):
        layer = torch.nn.Linear(8, 4).to("cuda")
        assert isinstance(layer.weight, FakeCudaTensor) and layer.weight.device.type == "cuda"
        x = torch.randn(2, 8)
        with pytest.raises(RuntimeError, match="same device"):
            layer(x)
        y = layer(x.cuda())
        assert y.device.type == "cuda" and torch.zeros(3, device="cuda").device.type == "cuda"
        assert torch.equal(y.cpu(), torch.nn.functional.linear(x, layer.weight.cpu(), layer.bias.cpu()))
        with pytest.raises(RuntimeError):
            y.numpy()


def test_local_scores_follow_the_weight_device(monkeypatch):
    samples = np.random.default_rng(0).standard_normal((1, 2, 1, 16, 64)).astype(np.float32)
    layer = torch.nn.Linear(64, 32)
    on_cpu = layer_scores(layer, samples, [get_format("hif4")], "mse").per_step["hif4"]
    with fake_cuda(monkeypatch):
        on_gpu = layer_scores(layer.to("cuda"), samples, [get_format("hif4")], "mse").per_step["hif4"]
    np.testing.assert_array_equal(on_cpu, on_gpu)


def test_chain_on_cuda(tmp_path, monkeypatch):
    """The chain with --device cuda. Ranks by mse: grad-e2e's backward passes need the autograd engine's CUDA
    support, which a CPU-only build lacks even for the fake device (its device path runs in the GPU check)."""
    runner = CliRunner()
    device = ["--device", "cuda", "--dtype", "fp32"]
    steps = [
        ["probe", "--limit", "2", "--steps", "2", *device, "--out", str(tmp_path / "probe.h5")],
        ["rank", str(tmp_path / "probe.h5"), *device, "--metric", "mse", "--out", str(tmp_path / "ranking.json")],
        ["rank", str(tmp_path / "probe.h5"), *device, "--metric", "e2e", "--limit", "1", "--expert", "high",
         "--out", str(tmp_path / "e2e.json")],
        ["plan", str(tmp_path / "ranking.json"), "--budget", "70%", "--out", str(tmp_path / "plan.json")],
        ["apply-plan", str(tmp_path / "plan.json"), *device, "--probe", str(tmp_path / "probe.h5"),
         "--calibrate", "mse", "--sequential-experts", "--out", str(tmp_path / "ckpt")],
        ["generate", "--model", str(tmp_path / "ckpt"), *device, "--limit", "1", "--steps", "2", "--no-video",
         "--out", str(tmp_path / "gen")],
        ["apply-plan", str(tmp_path / "plan.json"), *device, "--probe", str(tmp_path / "probe.h5"),
         "--calibrate", "gptq", "--out", str(tmp_path / "ckpt-gptq")],  # GPTQ on the weights' device
        ["generate", "--model", str(tmp_path / "ckpt-gptq"), *device, "--limit", "1", "--steps", "2", "--no-video",
         "--out", str(tmp_path / "gen-gptq")],
    ]
    with fake_cuda(monkeypatch):
        for args in steps:
            result = runner.invoke(main, args)
            assert result.exit_code == 0, (args[0], result.output, result.exception)
        cpu_rank = runner.invoke(main, ["rank", str(tmp_path / "probe.h5"), "--device", "cpu", "--metric", "mse",
                                        "--out", str(tmp_path / "ranking-cpu.json")])
    assert cpu_rank.exit_code == 0, cpu_rank.output

    def values(name):
        ranking = json.loads((tmp_path / name).read_text())
        return {(e, layer["name"]): layer["value"] for e, layers in ranking["experts"].items() for layer in layers}

    assert values("ranking.json") == values("ranking-cpu.json")  # same numbers, computed on "the GPU"
    assert all(math.isfinite(v["hif4"]) for v in values("e2e.json").values())
    latents = load_file(next((tmp_path / "gen" / "latents").glob("*.safetensors")))
    assert latents and all(torch.isfinite(t).all() for t in latents.values())


def test_ltx_chain_on_cuda(tmp_path, monkeypatch):
    """The non-Wan family on "the GPU": batched CFG split, LTX's block arguments replayed by calibration,
    its own schedule and packed latents."""
    runner = CliRunner()
    device = ["--device", "cuda", "--dtype", "fp32"]
    model, euler = ["--model", "tiny-ltx"], ["--scheduler", "euler"]
    steps = [
        ["probe", *model, "--limit", "1", "--steps", "2", *euler, *device, "--out", str(tmp_path / "probe.h5")],
        ["rank", str(tmp_path / "probe.h5"), *device, "--metric", "e2e", "--granularity", "block",
         "--out", str(tmp_path / "e2e.json")],
        ["rank", str(tmp_path / "probe.h5"), *device, "--metric", "mse", "--out", str(tmp_path / "ranking.json")],
        ["plan", str(tmp_path / "ranking.json"), "--budget", "70%", "--out", str(tmp_path / "plan.json")],
        ["apply-plan", str(tmp_path / "plan.json"), *model, *device, "--probe", str(tmp_path / "probe.h5"),
         "--calibrate", "mse", "--out", str(tmp_path / "ckpt")],
        ["generate", "--model", str(tmp_path / "ckpt"), *device, "--limit", "1", "--steps", "2", *euler,
         "--no-video", "--out", str(tmp_path / "gen")],
    ]
    with fake_cuda(monkeypatch):
        for args in steps:
            result = runner.invoke(main, args)
            assert result.exit_code == 0, (args[0], result.output, result.exception)
    e2e = json.loads((tmp_path / "e2e.json").read_text())["experts"]["main"]
    assert all(math.isfinite(layer["value"]["hif4"]) for layer in e2e)
    latents = load_file(next((tmp_path / "gen" / "latents").glob("*.safetensors")))
    assert latents and all(torch.isfinite(t).all() and t.dim() == 5 for t in latents.values())
