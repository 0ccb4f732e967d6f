"""Source models: the embedded tiny pipelines, a local diffusers folder, or a Hub id from the cache only.

Importing this package registers the built-in model families (:mod:`sensq.models.family`): Wan2.2-T2V-A14B
and single-expert Wan (:mod:`sensq.models.wan`), LTX-Video (:mod:`sensq.models.ltx`). Quantized sensq
checkpoints load through :func:`sensq.loading.load_model`, which also takes everything this module loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sensq.errors import InputError
from sensq.models import ltx, wan
from sensq.models.family import FAMILIES, ModelFamily, family_of, get_family, recorded_family
from sensq.models.layers import quantizable_layers

__all__ = ["FAMILIES", "LoadedModel", "ModelFamily", "family_of", "get_family", "recorded_family", "load_source_model",
           "model_fingerprint", "quantizable_layers"]

EMBEDDED = {**wan.TINY_MODELS, **ltx.TINY_MODELS}
"""Embedded model name -> how to build it (random weights, seeds fixed, nothing downloaded)."""

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
        family: the model's family (experts, routing, blocks, entrance layers; :mod:`sensq.models.family`).
        model_id: what the user passed (``tiny``, a folder, a Hub id).
        fingerprint: see :func:`model_fingerprint`.
        default_resolution: (height, width, frames) when the user passes none.
        loras: expert -> LoRA file fused into it (:func:`sensq.models.lora.fuse_loras`); empty for none.
        source_id: for a quantized checkpoint, the model it was made from; else ``""``.
    """

    pipe: object
    family: ModelFamily
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
    return list(EMBEDDED) + list(PROCEDURAL_MODELS)


def model_fingerprint(pipe, family: ModelFamily) -> str:
    """A 16-hex-digit fingerprint of the experts: configs, parameter names, shapes, dtypes, and up to
    1024 values sampled at a fixed stride from every tensor (hashing all of A14B's 57 GB would take
    minutes; two checkpoints that differ only in unsampled elements get the same fingerprint)."""
    digest = hashlib.sha256()
    for expert in family.experts(pipe):
        module = family.expert_module(pipe, expert)
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
    from diffusers import DiffusionPipeline

    if not (path / "model_index.json").is_file():
        raise InputError(f"{str(path)!r} has no model_index.json: not a diffusers pipeline folder")
    try:
        with quiet_hf_progress():
            pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - diffusers' loader raises many kinds; report any as one line
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot load the pipeline in {str(path)!r}: {first_line}") from None
    family_of(pipe)  # an InputError naming the supported families for any other pipeline
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


def load_source_model(model: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load ``model``: an embedded name (:func:`model_names`), a local diffusers folder, or a Hub id that is
    already in the local cache (a sensq checkpoint: :func:`sensq.loading.load_model`).

    Raises:
        InputError: unknown name, folder without a pipeline, Hub id not cached, a pipeline of no
            registered family.
    """
    if model in EMBEDDED:
        tiny = EMBEDDED[model]
        pipe = tiny.build()
        resolution = tiny.resolution
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        pipe = _from_folder(model_folder(model), dtype)
        resolution = default_resolution(pipe, family_of(pipe))
    family = family_of(pipe)
    pipe.to(device=device)
    pipe.set_progress_bar_config(disable=True)  # sensq shows its own progress
    return LoadedModel(pipe, family, model, model_fingerprint(pipe, family), resolution, device, dtype)


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
        InputError: as :func:`load_source_model`.
    """
    from sensq.models.layers import layer_infos

    if model in EMBEDDED:
        pipe = EMBEDDED[model].build()
        family = family_of(pipe)
        return layer_infos({e: family.expert_module(pipe, e) for e in family.experts(pipe)})
    path = model_folder(model)
    family = folder_family(path)
    experts = {}
    for expert, attr in family.expert_attrs.items():
        config = family.transformer_type().load_config(str(path / attr))
        with torch.device("meta"):
            experts[expert] = family.transformer_type().from_config(config)
    return layer_infos(experts)


def folder_family(path: Path) -> ModelFamily:
    """The family of a diffusers pipeline folder, from its model_index.json and which expert folders hold a
    config.json (without loading anything).

    Raises:
        InputError: no model_index.json, or no registered family matches.
    """
    index = path / "model_index.json"
    attrs = {attr for f in FAMILIES.values() for attr in f.expert_attrs.values()}
    present = {attr for attr in attrs if (path / attr / "config.json").is_file()}
    if index.is_file():
        pipeline_class = _class_name(index)
        found = [f for f in FAMILIES.values() if f.pipeline_class == pipeline_class]
    else:  # only the transformer configs (enough for an inventory): the family by its transformer class
        classes = {_class_name(path / attr / "config.json") for attr in present}
        pipeline_class = "folder of " + (", ".join(sorted(filter(None, classes))) or "no transformer config")
        found = [f for f in FAMILIES.values() if {f.transformer_class} == classes]
    for family in found:
        if present == set(family.expert_attrs.values()):
            return family
    raise InputError(f"{str(path)!r} holds a {pipeline_class} with {sorted(present) or 'no'} expert folders; sensq "
                     "has no model family for it (supported: "
                     + "; ".join(f"{f.name} ({f.description})" for f in FAMILIES.values()) + ")")


def _class_name(config_file: Path) -> str | None:
    try:
        return json.loads(config_file.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise InputError(f"{str(config_file)!r} is not a valid diffusers config (JSON object)") from None


def default_resolution(pipe, family: ModelFamily) -> tuple[int, int, int]:
    """Tiny saved pipelines (hidden size < 1024) keep tiny defaults; real ones get the family's."""
    expert = family.expert_module(pipe, family.experts(pipe)[0])
    hidden = expert.config.num_attention_heads * expert.config.attention_head_dim
    return family.tiny_resolution if hidden < 1024 else family.default_resolution


def load_a14b_width(num_layers: int = 1, seed: int = 1) -> LoadedModel:
    """A measurement model with Wan2.2-T2V-A14B's layer widths on the CPU: the ``tiny-realshape`` pipeline
    (4096-wide text input) whose two experts are ``WanTransformer3DModel`` with the real A14B config except
    ``num_layers`` (585 M parameters per expert at 1 block: the 5120/13824-wide blocks, the real condition
    embedder and proj_out), random weights, fp32. For timing sensq's work at real widths (benchmarks,
    experiments/rank_a14b_width.py), not for generating anything."""
    model = load_source_model("tiny-realshape", torch.device("cpu"), torch.float32)
    family = model.family
    for offset, attr in enumerate(family.expert_attrs.values()):
        torch.manual_seed(seed + offset)
        setattr(model.pipe, attr, family.transformer_type()(**{**family.real_config, "num_layers": num_layers}).eval())
    model.model_id = f"a14b-width-{num_layers}"
    model.fingerprint = model_fingerprint(model.pipe, model.family)
    return model
