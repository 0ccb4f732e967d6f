"""The procedural world and its evaluator: perfect clips score high, each corruption lowers its dimension."""

import numpy as np
import pytest

from sensq.eval.procedural import BACKGROUNDS, DIMENSIONS, Scene, all_scenes, render, score_clip

SCENE = Scene("circle", "red", "down", "gray")


def test_world_and_prompts():
    scenes = all_scenes()
    assert len(scenes) == 120 and len({s.prompt for s in scenes}) == 120
    assert SCENE.prompt == "a red circle moving down on a gray background"
    assert Scene.parse(SCENE.prompt) == SCENE
    with pytest.raises(ValueError, match="no single shape"):
        Scene.parse("a cat walking on a beach")
    clip = render(SCENE)
    assert clip.shape == (9, 32, 32, 3) and clip.dtype == np.float32 and 0 <= clip.min() and clip.max() <= 1


def test_every_ground_truth_clip_scores_high():
    scores = np.array([[score_clip(render(s), s.prompt)[d] for d in DIMENSIONS] for s in all_scenes()])
    assert (scores[:, DIMENSIONS.index("overall_consistency")] == 1.0).all()
    assert scores.min(axis=0).tolist() == pytest.approx([0.95, 0.993, 0.877, 1.0, 0.892], abs=0.01)


def _drop(corrupted, dimension):
    perfect = score_clip(render(SCENE), SCENE.prompt)[dimension]
    return perfect - score_clip(corrupted, SCENE.prompt)[dimension]


def test_each_corruption_lowers_its_dimension():
    rng = np.random.default_rng(0)
    clip = render(SCENE)
    noisy = np.clip(clip + rng.normal(0, 0.1, clip.shape), 0, 1)
    assert _drop(noisy, "imaging_quality") > 0.4 and _drop(noisy, "aesthetic_quality") > 0.05
    shaky = np.stack([render(SCENE, jitter=tuple(rng.normal(0, 0.05, 2)))[i] for i in range(9)])
    assert _drop(shaky, "motion_smoothness") > 0.5
    wrong = render(Scene("square", "blue", "up", "gray"))
    assert score_clip(wrong, SCENE.prompt)["overall_consistency"] == 0.0
    morph = np.stack([render(Scene(("circle", "square")[i % 2], ("red", "yellow")[i % 2], "down", "gray"))[i]
                      for i in range(9)])
    assert _drop(morph, "subject_consistency") > 0.15
    dirty = clip.copy()
    dirty[:, :4] += 0.15  # a faint band over the background (too faint to pass for the object)
    assert _drop(dirty, "aesthetic_quality") > 0.015


def test_an_empty_clip_scores_zero_except_its_clean_background():
    blank = np.broadcast_to(np.array(BACKGROUNDS["gray"], dtype=np.float32), (9, 32, 32, 3))
    scores = score_clip(blank, SCENE.prompt)
    assert scores["aesthetic_quality"] == pytest.approx(1.0)
    assert all(scores[d] == 0.0 for d in DIMENSIONS if d != "aesthetic_quality")


def test_procedural_evaluation_of_a_generation_folder(tmp_path):
    """A generation folder whose frames are replaced by the ground truth scores like the ground truth; the
    random tiny model's own frames score lower on prompt consistency."""
    import json

    import torch

    from sensq.eval import evaluate_procedural, is_procedural
    from sensq.generate import GenerateRequest, generate
    from sensq.loading import load_model
    from sensq.prompts import PROCEDURAL_PROMPTS, load_prompts
    from sensq.trajectory import Trajectory

    prompts = load_prompts(None, 3, procedural=True)
    assert [p.text for p in prompts] == list(PROCEDURAL_PROMPTS[:3]) and is_procedural([p.text for p in prompts])
    assert not is_procedural(["a cat on a beach"])
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    trajectory = Trajectory(steps=2).with_resolution(model.default_resolution)
    generate(GenerateRequest(model, trajectory, prompts, tmp_path / "run", write_video=False))
    random_model = evaluate_procedural(tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    for item in manifest["items"].values():
        truth = render(Scene.parse(item["prompt"]))
        np.save(tmp_path / "run" / item["frames"], np.round(truth * 255).astype(np.uint8))
    truth_scores = evaluate_procedural(tmp_path / "run")
    assert truth_scores["aggregate"]["overall_consistency"] == 1.0
    assert truth_scores["aggregate"]["average"] > random_model["aggregate"]["average"]
    assert (tmp_path / "run" / "procedural.json").is_file()
