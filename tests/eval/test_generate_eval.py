"""Matched generation (resumable, one config per folder) and fidelity evaluation."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sensq.cli import main
from sensq.errors import InputError, OutputError
from sensq.eval import evaluate_fidelity
from sensq.eval.fidelity import fidelity, psnr, ssim
from sensq.generate import GenerateRequest, generate, video_name
from sensq.loading import load_model
from sensq.plan import Plan, Rule
from sensq.prompts import Prompt, load_prompts
from sensq.quant.apply import apply_plan
from sensq.trajectory import Trajectory


def test_metric_definitions():
    rng = np.random.default_rng(0)
    clip = rng.random((3, 24, 24, 3))
    assert np.isinf(psnr(clip, clip)).all() and np.allclose(ssim(clip, clip), 1.0)
    noisy = np.clip(clip + 0.01, 0, 1)
    assert (psnr(clip, noisy) > 35).all() and (ssim(clip, noisy) < 1).all()
    worse = np.clip(clip + rng.normal(0, 0.2, clip.shape), 0, 1)
    assert (psnr(clip, worse) < psnr(clip, noisy)).all() and (ssim(clip, worse) < ssim(clip, noisy)).all()
    # a constant offset on every frame leaves the motion (frame differences) unchanged
    shifted = clip * 0.5 + 0.25
    moved = shifted + 0.1
    assert fidelity(shifted, moved)["temporal_nmse"] == pytest.approx(0.0, abs=1e-20)
    assert fidelity(clip, worse)["temporal_nmse"] > 0
    assert fidelity(clip, clip)["psnr"] == math.inf


def test_video_names_follow_vbench_and_stay_short():
    assert video_name(Prompt(3, "a cat/dog")) == "a cat_dog-3.mp4"
    assert len(video_name(Prompt(1, "x" * 1000)).encode()) < 255


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    trajectory = Trajectory(steps=3).with_resolution(model.default_resolution)
    prompts = load_prompts(None, 2)
    generate(GenerateRequest(model, trajectory, prompts, folder / "fp"))
    apply_plan(model, Plan([Rule("re:(high|low):.*", "hif4", "hif4")]))
    generate(GenerateRequest(model, trajectory, prompts, folder / "q", label="hif4", plan_digest="p"))
    return folder, model, trajectory, prompts


def test_generation_folder(runs):
    folder, _, _, _ = runs
    manifest = json.loads((folder / "fp" / "manifest.json").read_text())
    assert manifest["schema"] == "sensq.generation/1" and set(manifest["items"]) == {"0", "1"}
    item = manifest["items"]["1"]
    assert item["seed"] == 1 and (folder / "fp" / item["video"]).stat().st_size > 0
    frames = np.load(folder / "fp" / item["frames"])
    assert frames.dtype == np.uint8 and frames.shape == (9, 32, 32, 3)


def test_rerun_skips_and_another_config_is_refused(runs):
    folder, model, trajectory, prompts = runs
    again = generate(GenerateRequest(model, trajectory, prompts, folder / "q", label="hif4", plan_digest="p"))
    assert again.generated == 0 and again.skipped == 2
    with pytest.raises(InputError, match="holds generations of another configuration"):
        generate(GenerateRequest(model, trajectory, prompts, folder / "q", label="hif4", plan_digest="other"))


def test_fidelity_of_quantized_against_full_precision(runs):
    folder, _, _, _ = runs
    scores = evaluate_fidelity(folder / "q", folder / "fp")
    assert set(scores["per_item"]) == {"0", "1"}
    assert 0 < scores["aggregate"]["latent_nmse"]["mean"] < 0.1
    assert scores["aggregate"]["ssim"]["mean"] < 1.0
    same = evaluate_fidelity(folder / "fp", folder / "fp")
    assert same["aggregate"]["latent_nmse"]["mean"] == 0.0 and same["aggregate"]["psnr"]["mean"] == math.inf
    assert (folder / "q" / "scores.json").is_file()


def test_missing_indices_fail_the_run(runs, tmp_path):
    folder, model, trajectory, _ = runs
    generate(GenerateRequest(model, trajectory, [Prompt(0, load_prompts(None, 1)[0].text)], tmp_path / "partial"))
    manifest = json.loads((tmp_path / "partial" / "manifest.json").read_text())
    manifest["config"]["prompts"].append([5, "a dog", ""])
    (tmp_path / "partial" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"prompt indices \[5\] lack a finished generation"):
        evaluate_fidelity(tmp_path / "partial", folder / "fp")


def test_cli_generate_and_eval(runs, tmp_path):
    folder, _, _, _ = runs
    runner = CliRunner()
    result = runner.invoke(main, ["generate", "--limit", "1", "--steps", "3", "--out", str(tmp_path / "fp"),
                                  "--no-video", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["generated"] == 1
    scores = runner.invoke(main, ["eval", str(tmp_path / "fp"), "--reference", str(folder / "fp"), "--json"])
    assert scores.exit_code == 0, scores.output
    assert json.loads(scores.stdout)["aggregate"]["latent_nmse"]["mean"] == 0.0  # same model, prompt and seed
    other = runner.invoke(main, ["generate", "--limit", "1", "--steps", "2", "--out", str(tmp_path / "fp2"),
                                 "--no-video"])
    assert other.exit_code == 0
    mismatch = runner.invoke(main, ["eval", str(tmp_path / "fp2"), "--reference", str(folder / "fp")])
    assert mismatch.exit_code == 1 and "were generated with different trajectories" in mismatch.output


def test_missing_video_backend_is_one_clear_error(runs, tmp_path, hide_package):
    folder, model, trajectory, prompts = runs
    hide_package("imageio_ffmpeg")
    with pytest.raises(InputError, match=r"writing mp4 needs imageio and imageio-ffmpeg: pip install 'sensq\[video\]'"):
        generate(GenerateRequest(model, trajectory, prompts[:1], tmp_path / "novideo"))
    # nothing half-written: the item is not in the manifest, so a rerun (with the backend) redoes it
    assert not (tmp_path / "novideo" / "manifest.json").exists()


def test_unwritable_output_folder(runs, tmp_path):
    _, model, trajectory, prompts = runs
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write .*sub.*: .*file' is a file"):
        generate(GenerateRequest(model, trajectory, prompts[:1], blocker / "sub"))


def test_a_reference_from_another_model_is_noted_and_other_prompts_are_refused(runs, tmp_path):
    import dataclasses

    folder, _, trajectory, prompts = runs
    other = dataclasses.replace(load_model("tiny", torch.device("cpu"), torch.float32), model_id="tiny-retrained",
                                fingerprint="0" * 16)
    generate(GenerateRequest(other, trajectory, prompts, tmp_path / "other", write_video=False))
    scores = evaluate_fidelity(tmp_path / "other", folder / "fp")
    assert scores["notes"] == ["the reference was generated by model 'tiny', this run by 'tiny-retrained'"]
    assert evaluate_fidelity(folder / "q", folder / "fp")["notes"] == []  # same model, quantized: no note
    swapped = [Prompt(p.index, "a blue square moving up", p.negative) for p in prompts]
    generate(GenerateRequest(other, trajectory, swapped, tmp_path / "swapped", write_video=False))
    with pytest.raises(InputError, match="prompt 0 is 'a blue square moving up' in .* but .* in the reference"):
        evaluate_fidelity(tmp_path / "swapped", folder / "fp")
