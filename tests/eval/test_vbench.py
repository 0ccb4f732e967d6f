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
from sensq.loading import load_model
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
    for f in required_files(["imaging_quality"], cache, torch_home):
        Path(f["path"]).parent.mkdir(parents=True, exist_ok=True)
        Path(f["path"]).touch()
    with pytest.raises(InputError, match=r"cannot run VBench: cannot import vbench: ModuleNotFoundError"):
        run_vbench(videos / "run", ["imaging_quality"], python=sys.executable, cache_dir=cache,
                   torch_home=torch_home)


def test_frames_too_small_for_amt_are_refused_before_running(videos, tmp_path):
    cache, torch_home = tmp_path / "c", tmp_path / "t"
    for f in required_files(["motion_smoothness"], cache, torch_home):
        Path(f["path"]).parent.mkdir(parents=True, exist_ok=True)
        Path(f["path"]).touch()
    height, width = json.loads((videos / "run" / "manifest.json").read_text())["config"]["trajectory"]["height"], \
        json.loads((videos / "run" / "manifest.json").read_text())["config"]["trajectory"]["width"]
    assert min(height, width) < 64
    with pytest.raises(InputError, match=rf"motion_smoothness needs frames of at least 64 px a side; .* has "
                                         rf"{height}x{width}: generate with larger --height/--width"):
        run_vbench(videos / "run", ["motion_smoothness"], python=sys.executable, cache_dir=cache,
                   torch_home=torch_home)


def test_a_failed_dimension_fails_the_run_and_keeps_the_rest(videos, tmp_path, monkeypatch):
    """The method's rule: every video needs every score. A runner that reports one dimension failing and one
    video unscored gives one error naming both, with what finished kept in vbench.json."""
    import subprocess

    from sensq.eval import vbench_eval

    cache, torch_home = tmp_path / "c", tmp_path / "t"
    for f in required_files(["imaging_quality", "overall_consistency"], cache, torch_home):
        Path(f["path"]).parent.mkdir(parents=True, exist_ok=True)
        Path(f["path"]).touch()
    names = sorted(vbench_eval.prompt_map(videos / "run"))

    def fake_runner(command, **kwargs):
        out = json.loads(Path(command[-1]).read_text())["out"]
        Path(out).write_text(json.dumps({
            "imaging_quality": {"raw": [50.0, [{"video_path": f"/x/{names[0]}", "video_results": 50.0}]],
                                "error": None},
            "overall_consistency": {"raw": None, "error": "RuntimeError: boom"}}))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(vbench_eval.subprocess, "run", fake_runner)
    with pytest.raises(InputError) as error:
        run_vbench(videos / "run", ["imaging_quality", "overall_consistency"], python=sys.executable,
                   cache_dir=cache, torch_home=torch_home)
    assert "VBench scores incomplete" in str(error.value)
    assert f"imaging_quality has no score for ['{names[1]}']" in str(error.value)
    assert "overall_consistency failed (RuntimeError: boom)" in str(error.value)
    kept = json.loads((videos / "run" / "vbench.json").read_text())["dimensions"]
    assert kept["imaging_quality"]["per_video"] == {names[0]: 0.5}


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
    assert scores["imaging_quality"] == {"mean": pytest.approx(0.615), "vbench_aggregate": 0.6123,
                                         "per_video": {"a-0.mp4": 0.61, "b-1.mp4": 0.62}, "error": None}
    assert scores["motion_smoothness"]["mean"] == 0.97 and scores["motion_smoothness"]["vbench_aggregate"] == 0.98
    assert scores["overall_consistency"] == {"mean": None, "vbench_aggregate": None, "per_video": {},
                                             "error": "RuntimeError: boom"}


def test_cli(videos):
    runner = CliRunner()
    dry = runner.invoke(main, ["eval", "--setup-vbench", "/tmp/vb-env", "--dry-run"])
    assert dry.exit_code == 0 and "pip install vbench==0.1.5 'setuptools<81'" in dry.output
    assert runner.invoke(main, ["eval", str(videos / "run")]).exit_code == 2
    result = runner.invoke(main, ["eval", str(videos / "run"), "--vbench", "--vbench-python", sys.executable,
                                  "--vbench-cache", "/nonexistent-cache", "--dims", "motion_smoothness"])
    assert result.exit_code == 1 and "VBench weights missing" in result.output
    assert json.loads((videos / "run" / "manifest.json").read_text())["items"]


def _vbench_python() -> str | None:
    import os
    import subprocess

    python = os.environ.get("SENSQ_VBENCH_PYTHON")
    if not python or not Path(python).is_file():
        return None
    return python if subprocess.run([python, "-c", "import vbench"], capture_output=True).returncode == 0 else None


@pytest.mark.slow
@pytest.mark.skipif(_vbench_python() is None, reason="needs a VBench environment: SENSQ_VBENCH_PYTHON "
                    "(sensq eval --setup-vbench DIR); writes ~2.5 GB of stand-in weights")
def test_real_vbench_package_with_standin_weights(tmp_path):
    """The real vbench 0.1.5 in its own interpreter, all 5 dimensions, offline, on random stand-in weights
    (experiments/vbench_standin.py): checks the plumbing end to end; the values mean nothing."""
    import subprocess

    python = _vbench_python()
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([python, str(root / "experiments" / "vbench_standin.py"), "--cache", str(tmp_path / "c"),
                           "--torch-home", str(tmp_path / "t")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    trajectory = Trajectory(steps=2, height=64, width=64, frames=9)
    generate(GenerateRequest(model, trajectory, load_prompts(None, 2), tmp_path / "run"))
    scores = run_vbench(tmp_path / "run", list(DIMENSIONS), python=python, cache_dir=tmp_path / "c",
                        torch_home=tmp_path / "t")
    videos = sorted(p.name for p in (tmp_path / "run").glob("*.mp4"))
    assert len(videos) == 2
    for dimension in DIMENSIONS:
        value = scores["dimensions"][dimension]
        assert value["error"] is None and sorted(value["per_video"]) == videos, (dimension, value)
        assert all(v == v and abs(v) < 10 for v in value["per_video"].values()), (dimension, value)  # finite


def test_check_vbench_without_videos(tmp_path, monkeypatch):
    cache, torch_home = tmp_path / "c", tmp_path / "t"
    runner = CliRunner()
    args = ["eval", "--check-vbench", "--vbench-python", sys.executable, "--vbench-cache", str(cache), "--torch-home",
            str(torch_home), "--dims", "imaging_quality"]
    result = runner.invoke(main, args)
    assert result.exit_code == 1 and "VBench weights missing" in result.output and "musiq_spaq" in result.output
    for f in required_files(["imaging_quality"], cache, torch_home):
        Path(f["path"]).parent.mkdir(parents=True, exist_ok=True)
        Path(f["path"]).touch()
    result = runner.invoke(main, args)  # this interpreter has no vbench
    assert result.exit_code == 1 and "cannot import vbench: ModuleNotFoundError" in result.output
    fake = tmp_path / "site"
    (fake / "vbench").mkdir(parents=True)
    (fake / "vbench" / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(fake))
    result = runner.invoke(main, args)
    assert result.exit_code == 0 and result.output.startswith(f"VBench ready: {sys.executable} imports vbench")
