"""Evaluation of generation folders: fidelity against full precision (offline, exact).

A run is accepted only when every prompt index has its frames and its scores (the method's rule):
otherwise evaluation fails and lists the missing indices.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sensq.errors import InputError
from sensq.eval.fidelity import fidelity
from sensq.generate import load_generation, read_frames, read_latents
from sensq.store.files import write_json

SCORES_SCHEMA = "sensq.scores/1"
SCORES_FILE = "scores.json"


def check_comparable(run: dict, reference: dict, run_dir: Path, reference_dir: Path) -> None:
    """A fidelity comparison is meaningful only between generations of the same prompts, seeds, resolution
    and trajectory.

    Raises:
        InputError: the first difference, named.
    """
    trajectory, ref_trajectory = run["config"]["trajectory"], reference["config"]["trajectory"]
    for key in sorted(set(trajectory) | set(ref_trajectory)):
        if trajectory.get(key) != ref_trajectory.get(key):
            raise InputError(f"{str(run_dir)!r} and {str(reference_dir)!r} were generated with different "
                             f"trajectories ({key}: {trajectory.get(key)!r} vs {ref_trajectory.get(key)!r}); compare "
                             "generations of the same schedule, resolution, guidance and seed")
    prompts = {int(i): (text, negative) for i, text, negative in run["config"]["prompts"]}
    ref_prompts = {int(i): (text, negative) for i, text, negative in reference["config"]["prompts"]}
    for index, (text, negative) in sorted(prompts.items()):
        if index in ref_prompts and ref_prompts[index] != (text, negative):
            raise InputError(f"prompt {index} is {text!r} in {str(run_dir)!r} but {ref_prompts[index][0]!r} in the "
                             "reference; compare generations of the same prompt file")


def evaluate_fidelity(run_dir: str | Path, reference_dir: str | Path) -> dict:
    """Score every generation of ``run_dir`` against the one with the same prompt index in ``reference_dir``.

    Writes ``scores.json`` into ``run_dir`` and returns it.

    Raises:
        InputError: the two folders used different trajectories or seeds, or a prompt index lacks its
            frames in either folder (all missing indices listed).
    """
    run_dir, reference_dir = Path(run_dir), Path(reference_dir)
    run, reference = load_generation(run_dir), load_generation(reference_dir)
    check_comparable(run, reference, run_dir, reference_dir)
    wanted = sorted(int(index) for index, _, _ in run["config"]["prompts"])
    missing = [i for i in wanted if str(i) not in run["items"] or str(i) not in reference["items"]]
    if missing:
        raise InputError(f"prompt indices {missing} lack a finished generation in {str(run_dir)!r} or "
                         f"{str(reference_dir)!r}; run sensq generate again (it resumes) before evaluating")
    per_item = {}
    for index in wanted:
        item, ref_item = run["items"][str(index)], reference["items"][str(index)]
        if item["seed"] != ref_item["seed"]:
            raise InputError(f"prompt {index} used seed {item['seed']} here and {ref_item['seed']} in the reference")
        frames = read_frames(run_dir, item).astype(np.float64) / 255.0
        ref_frames = read_frames(reference_dir, ref_item).astype(np.float64) / 255.0
        if frames.shape != ref_frames.shape:
            raise InputError(f"prompt {index}: frames {list(frames.shape)} here but {list(ref_frames.shape)} in the "
                             "reference; compare generations of the same resolution")
        latents = ref_latents = None
        if "latents" in item and "latents" in ref_item:
            latents, ref_latents = read_latents(run_dir, item), read_latents(reference_dir, ref_item)
        per_item[str(index)] = fidelity(ref_frames, frames, ref_latents, latents)
    keys = sorted({k for scores in per_item.values() for k in scores})
    aggregate = {}
    for key in keys:
        values = np.array([scores[key] for scores in per_item.values() if key in scores], dtype=np.float64)
        finite = values[np.isfinite(values)]
        aggregate[key] = {"mean": float(finite.mean()) if finite.size else math.inf,
                          "worst": float(values.max() if key.endswith("nmse") else values.min())}
    scores = {"schema": SCORES_SCHEMA, "run": str(run_dir), "reference": str(reference_dir),
              "label": run["config"].get("label"), "per_item": per_item, "aggregate": aggregate}
    write_json(run_dir / SCORES_FILE, scores)
    return scores


PROCEDURAL_FILE = "procedural.json"


def is_procedural(prompts: list[str]) -> bool:
    """True when every prompt belongs to the procedural world (its ground truth is known)."""
    from sensq.eval.procedural import Scene

    try:
        for prompt in prompts:
            Scene.parse(prompt)
    except ValueError:
        return False
    return bool(prompts)


def evaluate_procedural(run_dir: str | Path) -> dict:
    """Score every generation of a folder with the procedural evaluator (exact ground truth, offline);
    writes ``procedural.json`` there.

    Raises:
        InputError: a prompt outside the procedural world, or a prompt index without its frames.
    """
    from sensq.eval.procedural import DIMENSIONS, score_clip

    run_dir = Path(run_dir)
    run = load_generation(run_dir)
    prompts = {str(index): text for index, text, _ in run["config"]["prompts"]}
    if not is_procedural(list(prompts.values())):
        raise InputError(f"{str(run_dir)!r} has prompts outside the procedural world; the procedural evaluator "
                         "scores prompts like 'a red circle moving left on a dark background'")
    missing = sorted(int(i) for i in prompts if i not in run["items"])
    if missing:
        raise InputError(f"prompt indices {missing} lack a finished generation in {str(run_dir)!r}")
    per_item = {}
    for index, text in prompts.items():
        frames = read_frames(run_dir, run["items"][index]).astype(np.float64) / 255.0
        per_item[index] = score_clip(frames, text)
    aggregate = {d: float(np.mean([scores[d] for scores in per_item.values()])) for d in DIMENSIONS}
    aggregate["average"] = float(np.mean([aggregate[d] for d in DIMENSIONS]))
    result = {"schema": "sensq.procedural/1", "run": str(run_dir), "per_item": per_item, "aggregate": aggregate}
    write_json(run_dir / PROCEDURAL_FILE, result)
    return result
