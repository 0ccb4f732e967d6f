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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import sensq
from sensq.errors import InputError, OutputError
from sensq.prompts import Prompt
from sensq.store.files import (
    atomic_write_bytes,
    check_output_folder,
    describe_os_error,
    inside,
    make_parent,
    output_lock,
    read_json,
    write_json,
)
from sensq.store.schema import Fields, ListOf, MapOf, validate_document
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
    warnings: list[str] = field(default_factory=list)
    """E.g. a step-range rule of the model's plan that no step of this trajectory reaches."""


def request_config(request: GenerateRequest) -> dict:
    """What decides a generation folder's identity (its ``config_digest``)."""
    return {
        "model_id": request.model.model_id, "model_fingerprint": request.model.fingerprint,
        "trajectory": request.trajectory.to_dict(), "plan_digest": request.plan_digest, "label": request.label,
        "prompts": [[p.index, p.text, p.negative] for p in request.prompts],
    }


def config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _check_video_backend() -> None:
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise InputError("writing mp4 needs imageio and imageio-ffmpeg: pip install 'sensq[video]', or pass "
                         "--no-video to keep frames only") from None


def _write_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    _check_video_backend()
    from diffusers.utils import export_to_video

    tmp = path.with_name(path.stem + ".tmp.mp4")
    try:
        export_to_video(list(frames), str(tmp), fps=fps)
        tmp.replace(path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OutputError(describe_os_error(error, path)) from None


def generate(request: GenerateRequest, progress: Callable[[int, int, Prompt], None] | None = None) -> GenerateResult:
    """Generate every prompt of ``request`` that the folder does not hold yet, holding the folder's lock
    (a second generate into the same folder is refused while this one runs).

    Raises:
        InputError: the folder holds generations of another configuration, a resolution the model or
            the memory cannot take.
        OutputError: the folder is someone else's, unwritable, or locked by another command; mp4 writing
            without imageio-ffmpeg.
    """
    out = check_output_folder(request.out, MANIFEST, GENERATION_SCHEMA, "generation folder")
    if request.fps < 1:
        raise InputError(f"--fps must be at least 1, got {request.fps}")
    if request.write_video:
        _check_video_backend()  # before any work
    make_parent(out)
    with output_lock(out):
        return _generate(request, progress)


def _generate(request: GenerateRequest, progress: Callable[[int, int, Prompt], None] | None) -> GenerateResult:
    out = request.out
    manifest = _claim_folder(request)
    pipe, trajectory = request.model.pipe, request.trajectory
    apply_trajectory(pipe, trajectory)
    request.model.family.check_resolution(pipe, trajectory.height, trajectory.width, trajectory.frames,
                                           request.model.dtype, request.model.device)
    from sensq.quant.phased import dead_ranges
    from sensq.trajectory import plan_steps

    warnings = dead_ranges(pipe, request.model.family,
                           [step.timestep for step in plan_steps(pipe, request.model.family, trajectory)])
    generated, seconds = 0, 0.0
    for position, prompt in enumerate(request.prompts):
        if str(prompt.index) in manifest["items"]:
            continue
        item = _generate_one(request, prompt)
        seconds += item["seconds"]
        generated += 1
        manifest["items"][str(prompt.index)] = item
        write_json(out / MANIFEST, manifest)  # after the files: an item in the manifest is complete
        if progress is not None:
            progress(position + 1, len(request.prompts), prompt)
    files = [str(out / MANIFEST)] + [str(out / i[k]) for i in manifest["items"].values()
                                     for k in ("frames", "latents", "video") if k in i]
    return GenerateResult(str(out), generated, len(request.prompts) - generated,
                          seconds / generated if generated else 0.0, files, warnings)


def _claim_folder(request: GenerateRequest) -> dict:
    """The folder's manifest: a new one written at once (the folder is this configuration's), or the existing one
    when it holds this very configuration.

    Raises:
        OutputError: the folder cannot be made.
        InputError: it holds generations of another configuration.
    """
    out = request.out
    config = request_config(request)
    digest = config_digest(config)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "frames").mkdir(exist_ok=True)
        if request.keep_latents:
            (out / "latents").mkdir(exist_ok=True)
    except OSError as error:
        raise OutputError(describe_os_error(error, out)) from None
    if (out / MANIFEST).exists():
        manifest = load_generation(out)
        if manifest["config_digest"] != digest:
            raise InputError(
                f"{str(out)!r} holds generations of another configuration (digest {manifest['config_digest']} "
                f"!= {digest}: model, plan, trajectory or prompts differ); a folder never mixes two: use another --out"
            )
        return manifest
    manifest = {"schema": GENERATION_SCHEMA, "sensq_version": sensq.__version__, "config_digest": digest,
                "config": config, "items": {}}
    write_json(out / MANIFEST, manifest)  # claims the folder for this configuration at once
    return manifest


def _generate_one(request: GenerateRequest, prompt: Prompt) -> dict:
    """Generate one prompt; its frames, latents and video written atomically; returns its manifest item."""
    pipe, trajectory, out = request.model.pipe, request.trajectory, request.out
    final: dict[str, torch.Tensor] = {}

    def keep_final(_pipe, i, _t, kwargs):
        if i == trajectory.steps - 1:
            latents = request.model.family.video_latents(pipe, kwargs["latents"].detach(), trajectory)
            final["latents"] = latents.cpu().clone()  # [B, C, F, H, W] in every family
        return kwargs

    started = time.perf_counter()
    seed = trajectory.seed + prompt.index
    frames = run(pipe, prompt.text, trajectory, seed=seed, callback=keep_final, output_type="np",
                 negative=prompt.negative)[0]
    frames_u8 = np.clip(np.round(np.asarray(frames) * 255.0), 0, 255).astype(np.uint8)
    item = {"index": prompt.index, "prompt": prompt.text, "seed": seed, "frames": f"frames/{prompt.index:05d}.npy"}
    atomic_write_bytes(out / item["frames"], _npy_bytes(frames_u8))
    if request.keep_latents:
        item["latents"] = f"latents/{prompt.index:05d}.safetensors"
        atomic_write_bytes(out / item["latents"], save_safetensors({"latents": final["latents"].contiguous()}))
    if request.write_video:
        item["video"] = video_name(prompt)
        _write_mp4(frames_u8, out / item["video"], request.fps)
    item["seconds"] = round(time.perf_counter() - started, 3)
    return item


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


_ITEM_SPEC = Fields(required={"index": int, "prompt": str, "seed": int, "frames": str},
                    optional={"latents": str, "video": str, "seconds": float})
_GENERATION_SPEC = Fields(
    required={"schema": str, "config_digest": str, "items": MapOf(_ITEM_SPEC),
              "config": Fields(required={"trajectory": dict, "prompts": ListOf(ListOf((int, str, None)))}, extra=True)},
    optional={"sensq_version": str},
    extra=True,
)


def load_generation(folder: str | Path) -> dict:
    """The manifest of a generation folder, checked: its shape, and that every file it names stays inside
    the folder.

    Raises:
        InputError: no manifest, another schema, a manifest of the wrong shape, a path leading outside.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise InputError(f"{str(folder)!r} is not a generation folder (no {MANIFEST}; make one with sensq generate)")
    manifest = validate_document(read_json(path, GENERATION_SCHEMA, "generation manifest"), _GENERATION_SPEC, path,
                                 "generation manifest")
    for item in manifest["items"].values():
        for key in ("frames", "latents", "video"):
            if key in item:
                inside(folder, item[key], f"the {key} file of prompt {item['index']}")
    return manifest


def read_frames(folder: str | Path, item: dict) -> np.ndarray:
    """An item's frames, ``uint8 [frames, height, width, 3]`` (never unpickled).

    Raises:
        InputError: a missing, truncated or malformed frames file (named, with the fix).
    """
    path = inside(folder, item["frames"], f"the frames file of prompt {item['index']}")
    try:
        frames = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"frames of prompt {item['index']} missing: {str(path)!r}; delete the folder's {MANIFEST} "
                         "entry or generate into a new folder") from None
    except (ValueError, OSError, EOFError) as error:
        raise InputError(f"frames file {str(path)!r} of prompt {item['index']} is truncated or not a .npy array "
                         f"({error}); generate into a new folder") from None
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"frames file {str(path)!r} holds {frames.dtype} {list(frames.shape)}; expected uint8 "
                         "[frames, height, width, 3]")
    return frames


def read_latents(folder: str | Path, item: dict) -> torch.Tensor | None:
    """An item's final latents from ``.safetensors`` (older folders: ``.pt``, read with ``weights_only``);
    None when the item kept none.

    Raises:
        InputError: a missing or unreadable latents file.
    """
    if "latents" not in item:
        return None
    path = inside(folder, item["latents"], f"the latents file of prompt {item['index']}")
    if not path.is_file():
        raise InputError(f"latents of prompt {item['index']} missing: {str(path)!r}; generate into a new folder")
    try:
        if path.suffix == ".safetensors":
            return load_safetensors(path.read_bytes())["latents"]
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - safetensors and torch raise several kinds for a damaged file
        raise InputError(f"latents file {str(path)!r} of prompt {item['index']} is damaged ({type(error).__name__}); "
                         "generate into a new folder") from None
