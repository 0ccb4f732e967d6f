"""VBench plumbing: weights pre-flight, the runner subprocess, score normalization (no weights, no vbench here)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sensq.cli import main
from sensq.errors import InputError
from sensq.eval.vbench_eval import DIMENSIONS, missing_files, normalize, required_files, run_vbench
from sensq.generate import GenerateRequest, generate
from sensq.models import load_model
from sensq.prompts import load_prompts
from sensq.trajectory import Trajectory


def test_required_files_are_the_documented_paths(tmp_path):
    cache, torch_home = tmp_path / "vbench", tmp_path / "torch"
    files = required_files(list(DIMENSIONS), cache, torch_home)
    paths = {Path(f["path"]).relative_to(tmp_path).as_posix() for f in files}
    assert paths == {
        "vbench/dino_model/facebookresearch_dino_main/hubconf.py",
        "vbench/dino_model/facebookresearch_dino_main/vision_transformer.py",
        "vbench/dino_model/facebookresearch_dino_main/utils.py",
        "vbench/dino_model/dino_vitbase16_pretrain.pth",
        "torch/hub/checkpoints/dino_vitbase16_pretrain.pth",
        "vbench/clip_model/ViT-L-14.pt",
        "vbench/aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
        "vbench/pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",
        "vbench/ViCLIP/ViClip-InternVid-10M-FLT.pth",
        "vbench/ViCLIP/bpe_simple_vocab_16e6.txt.gz",
        "vbench/amt_model/amt-s.pth",
    }
    assert len(missing_files(["motion_smoothness"], cache, torch_home)) == 1
    for f in files:
        Path(f["path"]).parent.mkdir(parents=True, exist_ok=True)
        Path(f["path"]).touch()
    assert missing_files(list(DIMENSIONS), cache, torch_home) == []
    with pytest.raises(InputError, match=r"unknown VBench dimension\(s\) \['dynamic_degree'\]"):
        required_files(["dynamic_degree"], cache, torch_home)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vb")
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    trajectory = Trajectory(steps=2).with_resolution(model.default_resolution)
    generate(GenerateRequest(model, trajectory, load_prompts(None, 2), folder / "run"))
    generate(GenerateRequest(model, trajectory, load_prompts(None, 1), folder / "frames-only", write_video=False))
    return folder


def test_missing_weights_name_dimension_file_and_source(videos, tmp_path):
    with pytest.raises(InputError) as error:
        run_vbench(videos / "run", ["imaging_quality", "motion_smoothness"], python=sys.executable,
                   cache_dir=tmp_path / "c", torch_home=tmp_path / "t")
    message = str(error.value)
    assert message.startswith("VBench weights missing and sensq never downloads them: ")
    assert f"imaging_quality: {tmp_path / 'c' / 'pyiqa_model' / 'musiq_spaq_ckpt-358bb6af.pth'} (from github.com/" \
           in message
    assert f"motion_smoothness: {tmp_path / 'c' / 'amt_model' / 'amt-s.pth'} (from huggingface.co/lalala125/AMT)" \
           in message


def test_runner_in_an_environment_without_vbench(videos, tmp_path):
    """The real runner, run by an interpreter that lacks vbench: pre-flight passes, the import fails."""
    cache, torch_home = tmp_path / "c", tmp_path / "t"
    for f in required_files(["motion_smoothness"], cache, torch_home):
        Path(f["path"]).parent.mkdir(parents=True, exist_ok=True)
        Path(f["path"]).touch()
    with pytest.raises(InputError, match=r"cannot run VBench: cannot import vbench: ModuleNotFoundError"):
        run_vbench(videos / "run", ["motion_smoothness"], python=sys.executable, cache_dir=cache,
                   torch_home=torch_home)


def test_interpreter_and_videos_are_required(videos, monkeypatch):
    monkeypatch.delenv("SENSQ_VBENCH_PYTHON", raising=False)
    with pytest.raises(InputError, match="VBench runs in its own environment: pass --vbench-python"):
        run_vbench(videos / "run", ["motion_smoothness"])
    with pytest.raises(InputError, match="VBench interpreter not found: '/nonexistent/python'"):
        run_vbench(videos / "run", ["motion_smoothness"], python="/nonexistent/python")


def test_frames_only_folder_is_refused(videos, tmp_path):
    from sensq.eval.vbench_eval import prompt_map

    with pytest.raises(InputError, match="has no mp4 videos"):
        prompt_map(videos / "frames-only")
    assert sorted(prompt_map(videos / "run").values()) == sorted(p.text for p in load_prompts(None, 2))


def test_normalize_vbench_output():
    raw = {
        "imaging_quality": {"raw": [0.6123, [{"video_path": "/v/a-0.mp4", "video_results": 61.0},
                                             {"video_path": "/v/b-1.mp4", "video_results": 62.0}]], "error": None},
        "motion_smoothness": {"raw": [0.98, [{"video_path": "/v/a-0.mp4", "video_results": 0.97}]], "error": None},
        "overall_consistency": {"raw": None, "error": "RuntimeError: boom"},
    }
    scores = normalize(raw)
    assert scores["imaging_quality"] == {"mean": pytest.approx(0.615), "per_video": {"a-0.mp4": 0.61, "b-1.mp4": 0.62},
                                         "error": None}
    assert scores["motion_smoothness"]["mean"] == 0.97
    assert scores["overall_consistency"] == {"mean": None, "per_video": {}, "error": "RuntimeError: boom"}


def test_cli(videos):
    runner = CliRunner()
    dry = runner.invoke(main, ["eval", "--setup-vbench", "/tmp/vb-env", "--dry-run"])
    assert dry.exit_code == 0 and "pip install vbench==0.1.5 'setuptools<81'" in dry.output
    assert runner.invoke(main, ["eval", str(videos / "run")]).exit_code == 2
    result = runner.invoke(main, ["eval", str(videos / "run"), "--vbench", "--vbench-python", sys.executable,
                                  "--vbench-cache", "/nonexistent-cache", "--dims", "motion_smoothness"])
    assert result.exit_code == 1 and "VBench weights missing" in result.output
    assert json.loads((videos / "run" / "manifest.json").read_text())["items"]
