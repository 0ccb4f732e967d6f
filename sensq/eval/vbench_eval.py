"""VBench (0.1.5), five dimensions, in an environment of its own, offline.

VBench pins old transformers/numpy and needs PyPI torch + torchvision, which cannot live beside
sensq's torch (shared/notes/vbench.md §3), so sensq runs it as a subprocess of another interpreter
(``--vbench-python`` or ``SENSQ_VBENCH_PYTHON``) with the standalone ``vbench_runner.py``. Weights come
from ``VBENCH_CACHE_DIR`` (and ``TORCH_HOME`` for DINO) only: missing files are reported before VBench
could try to download them, one line per file, naming the dimension, the path and the source.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from sensq.errors import InputError
from sensq.generate import load_generation
from sensq.store.files import write_json

DIMENSIONS = ("subject_consistency", "aesthetic_quality", "imaging_quality", "overall_consistency",
              "motion_smoothness")
RUNNER = Path(__file__).with_name("vbench_runner.py")
VBENCH_SCHEMA = "sensq.vbench/1"

# shared/notes/vbench.md §4: exactly what `evaluate(local=True)` reads, and where each file comes from
_FILES = {
    "subject_consistency": [
        ("C", "dino_model/facebookresearch_dino_main/hubconf.py", "github.com/facebookresearch/dino (repository)"),
        ("C", "dino_model/facebookresearch_dino_main/vision_transformer.py", "github.com/facebookresearch/dino"),
        ("C", "dino_model/facebookresearch_dino_main/utils.py", "github.com/facebookresearch/dino"),
        ("C", "dino_model/dino_vitbase16_pretrain.pth", "dl.fbaipublicfiles.com/dino (must exist; not read)"),
        ("T", "hub/checkpoints/dino_vitbase16_pretrain.pth", "dl.fbaipublicfiles.com/dino (the weights loaded)"),
    ],
    "aesthetic_quality": [
        ("C", "clip_model/ViT-L-14.pt", "openaipublic.azureedge.net (OpenAI CLIP ViT-L/14)"),
        ("C", "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth", "github.com/LAION-AI/aesthetic-predictor"),
    ],
    "imaging_quality": [
        ("C", "pyiqa_model/musiq_spaq_ckpt-358bb6af.pth", "github.com/chaofengc/IQA-PyTorch releases v0.1-weights"),
    ],
    "overall_consistency": [
        ("C", "ViCLIP/ViClip-InternVid-10M-FLT.pth", "huggingface.co/OpenGVLab/VBench_Used_Models"),
        ("C", "ViCLIP/bpe_simple_vocab_16e6.txt.gz", "the openai-clip package (clip/bpe_simple_vocab_16e6.txt.gz)"),
    ],
    "motion_smoothness": [
        ("C", "amt_model/amt-s.pth", "huggingface.co/lalala125/AMT"),
    ],
}

SETUP_COMMANDS = (
    "{python} -m venv {dir}",
    "{dir}/bin/pip install torch==2.14.1 torchvision==0.29.1",
    "{dir}/bin/pip install vbench==0.1.5 'setuptools<81'",
)


def cache_dirs(cache_dir: str | Path | None = None, torch_home: str | Path | None = None) -> tuple[Path, Path]:
    cache = Path(cache_dir or os.environ.get("VBENCH_CACHE_DIR") or Path.home() / ".cache" / "vbench")
    torch_dir = Path(torch_home or os.environ.get("TORCH_HOME") or Path.home() / ".cache" / "torch")
    return cache, torch_dir


def check_dimensions(dimensions: list[str]) -> list[str]:
    unknown = [d for d in dimensions if d not in DIMENSIONS]
    if unknown:
        raise InputError(f"unknown VBench dimension(s) {unknown}; sensq runs: {', '.join(DIMENSIONS)}")
    return list(dimensions)


def required_files(dimensions: list[str], cache: Path, torch_home: Path) -> list[dict]:
    """Every file the dimensions read, as ``{dimension, path, source}``."""
    roots = {"C": cache, "T": torch_home}
    return [{"dimension": d, "path": str(roots[root] / rel), "source": source}
            for d in check_dimensions(dimensions) for root, rel, source in _FILES[d]]


def missing_files(dimensions: list[str], cache: Path, torch_home: Path) -> list[dict]:
    return [entry for entry in required_files(dimensions, cache, torch_home) if not Path(entry["path"]).is_file()]


def _missing_message(missing: list[dict]) -> str:
    lines = "; ".join(f"{m['dimension']}: {m['path']} (from {m['source']})" for m in missing)
    return f"VBench weights missing and sensq never downloads them: {lines}"


def prompt_map(generation_dir: Path) -> dict[str, str]:
    """``{video file name: prompt}`` for every finished video of a generation folder."""
    manifest = load_generation(generation_dir)
    videos = {item["video"]: item["prompt"] for item in manifest["items"].values() if "video" in item}
    if not videos:
        raise InputError(f"{str(generation_dir)!r} has no mp4 videos (generated with --no-video?); VBench scores "
                         "videos: run sensq generate with --video")
    return videos


def normalize(raw: dict) -> dict:
    """VBench's ``{dim: [aggregate, [{video_path, video_results}, ...]]}`` -> per-video values on one
    scale (imaging_quality per-video values are 0-100, divided by 100), their mean over videos (``mean``),
    and VBench's own aggregate (``vbench_aggregate``: frame-weighted for subject_consistency)."""
    out = {}
    for dimension, entry in raw.items():
        if entry.get("raw") is None:
            out[dimension] = {"mean": None, "vbench_aggregate": None, "per_video": {}, "error": entry.get("error")}
            continue
        aggregate, videos = entry["raw"]
        per_video = {}
        for video in videos:
            value = float(video["video_results"])
            if dimension == "imaging_quality":
                value /= 100.0
            per_video[Path(video["video_path"]).name] = value
        mean = sum(per_video.values()) / len(per_video) if per_video else None
        out[dimension] = {"mean": mean, "vbench_aggregate": float(aggregate), "per_video": per_video, "error": None}
    return out


MIN_SIDE = {"motion_smoothness": 64}
"""Smallest frame side (px) a dimension's network accepts: AMT-S fails below 64 (measured: 48 fails, 64 runs)."""


def _check_frame_size(generation_dir: Path, dimensions: list[str]) -> None:
    trajectory = load_generation(generation_dir)["config"]["trajectory"]
    side = min(trajectory.get("height") or 0, trajectory.get("width") or 0)
    too_small = [d for d in dimensions if side and side < MIN_SIDE.get(d, 0)]
    if too_small:
        raise InputError(f"{', '.join(too_small)} needs frames of at least {MIN_SIDE[too_small[0]]} px a side; "
                         f"{str(generation_dir)!r} has {trajectory['height']}x{trajectory['width']}: generate with "
                         "larger --height/--width, or leave it out with --dims")


def _incomplete(scores: dict, videos: dict) -> list[str]:
    problems = []
    for dimension, value in scores.items():
        if value["error"]:
            problems.append(f"{dimension} failed ({value['error']})")
        elif missing := sorted(set(videos) - set(value["per_video"])):
            problems.append(f"{dimension} has no score for {missing}")
    return problems


def _interpreter(python: str | None) -> str:
    python = python or os.environ.get("SENSQ_VBENCH_PYTHON")
    if not python:
        raise InputError("VBench runs in its own environment: pass --vbench-python PATH or set SENSQ_VBENCH_PYTHON "
                         "(create one with: sensq eval --setup-vbench DIR)")
    if not Path(python).is_file():
        raise InputError(f"VBench interpreter not found: {python!r} (create one with: sensq eval --setup-vbench DIR)")
    return python


def _preflight(dimensions: list[str], python: str | None, cache_dir, torch_home) -> tuple[list[str], str, Path, Path]:
    """What every VBench entry point checks first: the dimensions, the interpreter, every weight file."""
    dimensions = check_dimensions(dimensions)
    python = _interpreter(python)
    cache, torch_dir = cache_dirs(cache_dir, torch_home)
    missing = missing_files(dimensions, cache, torch_dir)
    if missing:
        raise InputError(_missing_message(missing))
    return dimensions, python, cache, torch_dir


def check_vbench(dimensions: list[str], *, python: str | None = None, cache_dir: str | Path | None = None,
                 torch_home: str | Path | None = None) -> str:
    """Everything ``run_vbench`` needs, checked without videos: the interpreter, that it imports vbench,
    every weight file of ``dimensions``. Returns a one-line summary.

    Raises:
        InputError: the first thing missing (all missing weight files listed at once).
    """
    dimensions, python, cache, torch_dir = _preflight(dimensions, python, cache_dir, torch_home)
    done = subprocess.run([python, "-c", "import vbench"], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(f"{python!r} cannot import vbench: {last} (create an environment with: sensq eval "
                         "--setup-vbench DIR)")
    return f"VBench ready: {python} imports vbench; weights of {', '.join(dimensions)} in {cache} and {torch_dir}"


def run_vbench(generation_dir: str | Path, dimensions: list[str], *, python: str | None = None,
               cache_dir: str | Path | None = None, torch_home: str | Path | None = None, device: str = "cpu",
               timeout: float | None = None) -> dict:
    """Score a generation folder with VBench in its own interpreter; writes ``vbench.json`` there.

    Raises:
        InputError: no VBench interpreter configured or found, weights missing (every file listed),
            vbench not importable there, the runner failing.
    """
    generation_dir = Path(generation_dir)
    dimensions, python, cache, torch_dir = _preflight(dimensions, python, cache_dir, torch_home)
    videos = prompt_map(generation_dir)
    _check_frame_size(generation_dir, dimensions)
    with tempfile.TemporaryDirectory() as tmp:
        config = {"videos": str(generation_dir.resolve()), "prompt_list": videos, "dimensions": dimensions,
                  "device": device, "work_dir": tmp, "out": str(Path(tmp) / "results.json"),
                  "required_files": required_files(dimensions, cache, torch_dir)}
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(config))
        env = {**os.environ, "VBENCH_CACHE_DIR": str(cache), "TORCH_HOME": str(torch_dir), "HF_HUB_OFFLINE": "1"}
        try:
            done = subprocess.run([python, str(RUNNER), str(config_path)], capture_output=True, text=True, env=env,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise InputError(f"VBench did not finish within {timeout} s") from None
        if done.returncode == 3:
            raise InputError(_missing_message(json.loads(done.stdout.strip().splitlines()[-1])))
        if done.returncode == 4:
            raise InputError(f"{python!r} cannot run VBench: {json.loads(done.stdout)['error']}")
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise InputError(f"the VBench runner failed (exit {done.returncode}): {tail[0]}")
        raw = json.loads(Path(config["out"]).read_text())
    scores = {"schema": VBENCH_SCHEMA, "dimensions": normalize(raw), "videos": len(videos), "device": device}
    write_json(generation_dir / "vbench.json", scores)
    problems = _incomplete(scores["dimensions"], videos)
    if problems:  # the method's rule: a run counts only when every video has every score
        raise InputError(f"VBench scores incomplete (what finished is in {str(generation_dir / 'vbench.json')!r}): "
                         + "; ".join(problems))
    return scores


def setup_commands(directory: str | Path, python: str = "python3") -> list[str]:
    """The commands that create a VBench environment (shared/notes/vbench.md §3: what worked here)."""
    return [c.format(python=python, dir=str(directory)) for c in SETUP_COMMANDS]
