"""Matched generations: the same prompts, indices, seeds, resolution, schedule and guidance for every
model variant, written as mp4 (VBench custom-input naming) plus frames, latents and a manifest.

A folder holds one configuration only (model fingerprint, trajectory, plan, prompts): rerunning
with the same configuration skips finished items; another configuration is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import sensq
from sensq.errors import InputError
from sensq.prompts import Prompt
from sensq.store.files import atomic_write_bytes, read_json, write_json
from sensq.trajectory import Trajectory, apply_trajectory, run

GENERATION_SCHEMA = "sensq.generation/1"
MANIFEST = "manifest.json"


def video_name(prompt: Prompt) -> str:
    """``{prompt}-{index}.mp4`` (VBench custom input), with ``/`` and control characters replaced and the
    prompt cut to 180 bytes so the name stays under the 255-byte file-name limit."""
    text = re.sub(r"[/\\\x00-\x1f]", "_", prompt.text).strip() or "prompt"
    text = text.encode()[:180].decode(errors="ignore")
    return f"{text}-{prompt.index}.mp4"


@dataclass
class GenerateRequest:
    model: object
    trajectory: Trajectory
    prompts: list[Prompt]
    out: Path
    label: str = "full precision"
    plan_digest: str | None = None
    keep_latents: bool = True
    write_video: bool = True
    fps: int = 16


@dataclass
class GenerateResult:
    out: str
    generated: int
    skipped: int
    seconds_per_video: float
    files: list[str]


def _config(request: GenerateRequest) -> dict:
    return {
        "model_id": request.model.model_id, "model_fingerprint": request.model.fingerprint,
        "trajectory": request.trajectory.to_dict(), "plan_digest": request.plan_digest, "label": request.label,
        "prompts": [[p.index, p.text, p.negative] for p in request.prompts],
    }


def config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _write_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise InputError("writing mp4 needs imageio and imageio-ffmpeg: pip install 'sensq[video]', or pass "
                         "--no-video to keep frames only") from None
    from diffusers.utils import export_to_video

    tmp = path.with_name(path.stem + ".tmp.mp4")
    export_to_video(list(frames), str(tmp), fps=fps)
    tmp.replace(path)


def generate(request: GenerateRequest, progress: Callable[[int, int, Prompt], None] | None = None) -> GenerateResult:
    """Generate every prompt of ``request`` that the folder does not hold yet.

    Raises:
        InputError: the folder holds generations of another configuration; an unwritable folder;
            mp4 writing without imageio-ffmpeg.
    """
    out = request.out
    config = _config(request)
    digest = config_digest(config)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "frames").mkdir(exist_ok=True)
        if request.keep_latents:
            (out / "latents").mkdir(exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot write to {str(out)!r}: {error.strerror}") from None
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest = read_json(manifest_path, GENERATION_SCHEMA, "generation manifest")
        if manifest["config_digest"] != digest:
            raise InputError(
                f"{str(out)!r} holds generations of another configuration (digest {manifest['config_digest']} != "
                f"{digest}: model, plan, trajectory or prompts differ); a folder never mixes two: use another --out"
            )
    else:
        manifest = {"schema": GENERATION_SCHEMA, "sensq_version": sensq.__version__, "config_digest": digest,
                    "config": config, "items": {}}
    pipe, trajectory = request.model.pipe, request.trajectory
    apply_trajectory(pipe, trajectory)
    generated, seconds = 0, 0.0
    for position, prompt in enumerate(request.prompts):
        key = str(prompt.index)
        if key in manifest["items"]:
            continue
        final: dict[str, torch.Tensor] = {}

        def keep_final(_pipe, i, _t, kwargs, final=final):
            if i == trajectory.steps - 1:
                final["latents"] = kwargs["latents"].detach().cpu().clone()
            return kwargs

        started = time.perf_counter()
        seed = trajectory.seed + prompt.index
        frames = run(pipe, prompt.text, trajectory, seed=seed, callback=keep_final, output_type="np",
                     negative=prompt.negative)[0]
        frames_u8 = np.clip(np.round(np.asarray(frames) * 255.0), 0, 255).astype(np.uint8)
        item = {"index": prompt.index, "prompt": prompt.text, "seed": seed,
                "frames": f"frames/{prompt.index:05d}.npy"}
        buffer = _npy_bytes(frames_u8)
        atomic_write_bytes(out / item["frames"], buffer)
        if request.keep_latents:
            item["latents"] = f"latents/{prompt.index:05d}.pt"
            import io

            data = io.BytesIO()
            torch.save(final["latents"], data)
            atomic_write_bytes(out / item["latents"], data.getvalue())
        if request.write_video:
            item["video"] = video_name(prompt)
            _write_mp4(frames_u8, out / item["video"], request.fps)
        item["seconds"] = round(time.perf_counter() - started, 3)
        seconds += item["seconds"]
        generated += 1
        manifest["items"][key] = item
        write_json(manifest_path, manifest)  # after the files: an item in the manifest is complete
        if progress is not None:
            progress(position + 1, len(request.prompts), prompt)
    files = [str(out / MANIFEST)] + [str(out / i[k]) for i in manifest["items"].values()
                                     for k in ("frames", "latents", "video") if k in i]
    return GenerateResult(str(out), generated, len(request.prompts) - generated,
                          seconds / generated if generated else 0.0, files)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def load_generation(folder: str | Path) -> dict:
    return read_json(Path(folder) / MANIFEST, GENERATION_SCHEMA, "generation manifest")
