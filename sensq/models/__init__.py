"""Loading models: the embedded tiny pipelines, a local diffusers folder, or a Hub id from the cache only."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sensq.errors import InputError
from sensq.models.wan import EXPERTS, TINY_SPECS, WanAdapter, build_tiny_pipeline, quantizable_layers

__all__ = ["EXPERTS", "LoadedModel", "WanAdapter", "load_model", "model_fingerprint", "quantizable_layers"]

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
TRAINED_DIR = Path(__file__).parent / "weights"
PROCEDURAL_MODELS = ("tiny-trained", "tiny-trained-4step", "tiny-deep", "tiny-deep-4step")
"""Embedded models trained on the procedural world (sensq.eval.procedural): their default prompts are
procedural ones and sensq eval scores them against exact ground truth."""


@dataclass
class LoadedModel:
    """A runnable pipeline and what sensq knows about it.

    Attributes:
        pipe: the diffusers pipeline, on ``device`` in ``dtype``.
        adapter: the model family's metadata (experts, routing, entrance layers).
        model_id: what the user passed (``tiny``, a folder, a Hub id).
        fingerprint: see :func:`model_fingerprint`.
        default_resolution: (height, width, frames) when the user passes none.
        loras: expert -> LoRA file fused into it (:func:`sensq.models.lora.fuse_loras`); empty for none.
        source_id: for a quantized checkpoint, the model it was made from; else ``""``.
    """

    pipe: object
    adapter: WanAdapter
    model_id: str
    fingerprint: str
    default_resolution: tuple[int, int, int]
    device: torch.device
    dtype: torch.dtype
    loras: dict[str, str] = field(default_factory=dict)
    source_id: str = ""

    @property
    def procedural(self) -> bool:
        """Trained on the procedural world (or quantized from such a model): procedural default prompts."""
        return (self.source_id or self.model_id) in PROCEDURAL_MODELS


def model_names() -> list[str]:
    """Embedded model names (a local folder or a cached Hub id work too)."""
    return list(TINY_SPECS) + list(PROCEDURAL_MODELS)


def model_fingerprint(pipe, adapter: WanAdapter) -> str:
    """A 16-hex-digit fingerprint of the experts: configs, parameter names, shapes, dtypes, and up to
    1024 values sampled at a fixed stride from every tensor (hashing all of A14B's 57 GB would take
    minutes; two checkpoints that differ only in unsampled elements get the same fingerprint)."""
    digest = hashlib.sha256()
    for expert in adapter.experts(pipe):
        module = adapter.expert_module(pipe, expert)
        digest.update(expert.encode())
        config = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}  # no bookkeeping keys
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, tensor in module.state_dict().items():
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            if tensor.device.type != "meta" and tensor.numel():
                flat = tensor.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 1024)][:1024]
                digest.update(sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def quiet_hf_progress():
    """Silence diffusers' and transformers' own progress bars (sensq reports its own progress)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def _from_folder(path: Path, dtype: torch.dtype):
    from diffusers import DiffusionPipeline, WanPipeline

    if not (path / "model_index.json").is_file():
        raise InputError(f"{str(path)!r} has no model_index.json: not a diffusers pipeline folder")
    try:
        with quiet_hf_progress():
            pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - diffusers' loader raises many kinds; report any as one line
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot load the pipeline in {str(path)!r}: {first_line}") from None
    if not isinstance(pipe, WanPipeline):
        raise InputError(f"{str(path)!r} holds a {type(pipe).__name__}; sensq supports WanPipeline (Wan2.1/2.2 T2V)")
    return pipe


def _from_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise InputError(
            f"model {repo_id!r} is not in the local Hugging Face cache and sensq never downloads at run time; "
            f"fetch it on a connected machine (huggingface-cli download {repo_id}) or pass a local folder"
        ) from None


def load_model(model: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load ``model``: an embedded name (``tiny``, ``tiny-realshape``, ``small``), a local diffusers
    folder, a sensq quantized checkpoint folder (``sensq apply-plan``), or a Hub id that is already in
    the local cache.

    Raises:
        InputError: unknown name, folder without a pipeline, Hub id not cached, unsupported pipeline.
    """
    adapter = WanAdapter()
    from sensq.quant.checkpoint import is_checkpoint, load_quantized

    if is_checkpoint(model):
        return load_quantized(model, device, None if dtype == torch.float32 else dtype)
    if model in TINY_SPECS:
        pipe = build_tiny_pipeline(model)
        resolution = TINY_SPECS[model].resolution
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        pipe = _from_folder(model_folder(model), dtype)
        resolution = _resolution_for(pipe, adapter)
    pipe.to(device=device)
    pipe.set_progress_bar_config(disable=True)  # sensq shows its own progress
    return LoadedModel(pipe, adapter, model, model_fingerprint(pipe, adapter), resolution, device, dtype)


def looks_like_path(model: str) -> bool:
    """A model argument meant as a path (``./x``, ``../x``, ``/x``, ``~/x``, ``a/b/c``, ``x\\y``): never taken
    for a Hub id (``org/name``), whose two parts cannot start with a dot."""
    parts = model.replace("\\", "/").split("/")
    return (model.startswith(("/", "~", ".")) or "\\" in model or len(parts) > 2
            or (len(parts) == 2 and (not parts[0] or not parts[1])))


def model_folder(model: str) -> Path:
    """The folder holding ``model``: a shipped trained model, a local folder, or a cached Hub id.

    Raises:
        InputError: none of those (the message lists the embedded models), a shipped model missing from
            this installation, a Hub id not in the local cache.
    """
    if model in PROCEDURAL_MODELS:
        folder = TRAINED_DIR / model
        if not (folder / "model_index.json").is_file():
            raise InputError(f"the embedded model {model!r} is not in this installation ({str(folder)!r} is missing)")
        return folder
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if looks_like_path(model):
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise InputError(f"model folder {model!r} {what}; give a diffusers or sensq checkpoint folder, an embedded "
                         f"model ({', '.join(model_names())}) or a cached Hub id (org/name)")
    if _HUB_ID.match(model) and not path.exists():
        return _from_hub_cache(model)
    raise InputError(f"unknown model {model!r}: not an embedded model ({', '.join(model_names())}), "
                     "not a folder, not a Hub id (org/name)")


def layer_inventory(model: str) -> list:
    """Every quantizable layer of every expert, without loading weights: embedded models are built
    (they are tiny); folders and cached Hub ids are instantiated from their configs on the meta device.

    Raises:
        InputError: as :func:`load_model`.
    """
    from diffusers import WanTransformer3DModel

    from sensq.plan import layer_infos

    adapter = WanAdapter()
    if model in TINY_SPECS:
        experts = {e: adapter.expert_module(build_tiny_pipeline(model), e) for e in EXPERTS}
    else:
        path = model_folder(model)
        experts = {}
        for expert, attr in adapter.expert_attrs.items():
            config_file = path / attr / "config.json"
            if config_file.is_file():
                config = WanTransformer3DModel.load_config(str(path / attr))
                with torch.device("meta"):
                    experts[expert] = WanTransformer3DModel.from_config(config)
        if not experts:
            raise InputError(f"{str(path)!r} has no transformer/config.json: not a Wan pipeline folder")
    return layer_infos(experts)


def _resolution_for(pipe, adapter: WanAdapter) -> tuple[int, int, int]:
    """Tiny saved pipelines keep tiny defaults; real ones get 480x832x81."""
    expert = adapter.expert_module(pipe, "high")
    hidden = expert.config.num_attention_heads * expert.config.attention_head_dim
    return (32, 32, 9) if hidden < 1024 else adapter.default_resolution


def load_a14b_width(num_layers: int = 1, seed: int = 1) -> LoadedModel:
    """A measurement model with Wan2.2-T2V-A14B's layer widths on the CPU: the ``tiny-realshape`` pipeline
    (4096-wide text input) whose two experts are ``WanTransformer3DModel`` with the real A14B config except
    ``num_layers`` (585 M parameters per expert at 1 block: the 5120/13824-wide blocks, the real condition
    embedder and proj_out), random weights, fp32. For timing sensq's work at real widths (benchmarks,
    experiments/rank_a14b_width.py), not for generating anything."""
    from diffusers import WanTransformer3DModel

    from sensq.models.wan import A14B_TRANSFORMER_CONFIG

    model = load_model("tiny-realshape", torch.device("cpu"), torch.float32)
    for offset, attr in enumerate(("transformer", "transformer_2")):
        torch.manual_seed(seed + offset)
        setattr(model.pipe, attr, WanTransformer3DModel(**{**A14B_TRANSFORMER_CONFIG, "num_layers": num_layers}).eval())
    model.model_id = f"a14b-width-{num_layers}"
    model.fingerprint = model_fingerprint(model.pipe, model.adapter)
    return model
