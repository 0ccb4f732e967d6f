"""The checkpoint's manifest and weight files read as untrusted input: schema and version, every listed file
inside the folder with its SHA-256, no pickle, packing headers and field sizes, finite tensors."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sensq.errors import InputError
from sensq.formats import PackedTensor, get_format
from sensq.formats.packing import stored_bytes
from sensq.models import get_family
from sensq.plan import LayerConfig, Rule
from sensq.store.files import (
    file_digest,
    inside,
    parse_json,
)
from sensq.store.schema import Fields, MapOf, validate_document

CHECKPOINT_SCHEMA = "sensq.checkpoint/1"
CHECKPOINT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Files a checkpoint may not hold: they load with pickle, which runs code (every component is safetensors)."""

_MANIFEST_SPEC = Fields(
    required={"schema": str, "files": MapOf(Fields(required={"sha256": str, "bytes": int})),
              "experts": MapOf(str), "layers": MapOf(Fields(
                  required={"weight": (str, None), "activation": (str, None), "weight_clip": float, "act_clip": float},
                  extra=True)), "plan": dict},
    optional={"version": int, "sensq_version": str, "packed": bool, "source_model": dict, "sizes": dict,
              "family": str},
    extra=True,
)


@dataclass
class CheckpointSizes:
    disk_bytes: int
    weight_bytes_bf16: int
    quantized_params: int
    quantized_weight_bytes: int
    effective_bits_quantized: float
    resident_weight_bytes_simulation: int


@dataclass(frozen=True)
class ManifestLayer:
    """One layer of a checkpoint's manifest: the typed config it was deployed with (its formats and step ranges)
    and what its calibration chose (clip factors, rotation). The entry's other keys record the calibration (method,
    curves, errors) for people and reports; loading does not read them."""

    config: LayerConfig
    weight_clip: float = 1.0
    act_clip: float = 1.0
    rotation: int | None = None

    def to_entry(self) -> dict:
        """The manifest's JSON object (``phases``: the step ranges, without their rule indices)."""
        config = self.config
        return {"weight": config.weight, "activation": config.activation, "weight_clip": self.weight_clip,
                "act_clip": self.act_clip, **({"rotation": self.rotation} if self.rotation else {}),
                **({"phases": [r.to_dict() for r in config.step_ranges]} if config.step_ranges else {})}

    @classmethod
    def from_entry(cls, qualified: str, entry: dict, where: str) -> ManifestLayer:
        """``entry`` (shape-checked by the manifest's schema) of layer ``expert:name``; ``where`` names the file.

        Raises:
            InputError: an unknown format, malformed step ranges.
        """
        expert, _, name = qualified.partition(":")
        for key in ("weight", "activation"):
            if entry[key] is not None:
                get_format(entry[key])
        step_ranges = ()
        if "phases" in entry:
            phases = entry["phases"]
            try:
                if not isinstance(phases, list) or not phases:
                    raise ValueError("'phases' must be a non-empty list")
                # each range checked as a plan rule's: known formats, one of steps or sigma, finite bounds in order
                step_ranges = tuple(Rule.from_dict({"weight": p.get("weight"), "activation": p.get("activation"),
                                                    "steps": p.get("steps"), "sigma": p.get("sigma"),
                                                    "match": name}).step_range() for p in phases)
                if None in step_ranges:
                    raise ValueError("each phase needs one of 'steps' or 'sigma'")
            except (InputError, ValueError, TypeError, AttributeError, KeyError) as error:
                raise InputError(f"{where}: {qualified} has malformed step ranges ({error})") from None
        config = LayerConfig(expert, name, entry["weight"], entry["activation"], step_ranges=step_ranges)
        return cls(config, entry["weight_clip"], entry["act_clip"], entry.get("rotation"))


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def read_manifest(path: str | Path, verify: bool = True) -> dict:
    """The manifest of a checkpoint folder, with every file checked against its recorded SHA-256.

    The hashes guard against corruption (a truncated copy, a flipped bit), not tampering: whoever can
    write the folder can write a matching manifest (docs/threat-model.md). What the checks do guarantee:
    every path the manifest names stays inside the folder, every file in the folder is listed and
    verified (the loader opens nothing unverified), and no file that loads with pickle is present.

    Raises:
        InputError: missing manifest, another or newer schema, a manifest of the wrong shape, a path leading
            outside the folder, an unlisted or pickle file, a missing, truncated or corrupted file.
    """
    folder = Path(path)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{str(folder)!r} is not a sensq checkpoint (no manifest.json)")
    manifest = parse_json(manifest_path, "checkpoint manifest")
    if not isinstance(manifest, dict):
        raise InputError(f"{str(manifest_path)!r} is not a checkpoint manifest (a JSON {type(manifest).__name__}, "
                         "not an object)")
    schema = manifest.get("schema", "")
    if not str(schema).startswith("sensq.checkpoint/"):
        raise InputError(f"{str(manifest_path)!r} has schema {schema!r}; expected {CHECKPOINT_SCHEMA!r}")
    version = manifest.get("version", 0)
    if (isinstance(version, int) and version > CHECKPOINT_VERSION) or schema != CHECKPOINT_SCHEMA:
        raise InputError(f"{str(folder)!r} was written by a newer sensq (schema {schema!r}); upgrade sensq to "
                         "load it")
    validate_document(manifest, _MANIFEST_SPEC, manifest_path, "checkpoint manifest")
    for expert, attr in manifest["experts"].items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", expert) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", attr):
            raise InputError(f"{str(manifest_path)!r} names expert {expert!r} -> {attr!r}; expert folders are plain "
                             "names (transformer, transformer_2): refusing it")
    if "family" in manifest:
        family = get_family(manifest["family"])
        if manifest["experts"] != family.expert_attrs:
            raise InputError(f"{str(manifest_path)!r} names experts {manifest['experts']} but its family "
                             f"{family.name} has {family.expert_attrs}")
    listed = {str(inside(folder, name, "file")) for name in manifest["files"]}
    for file in sorted(folder.rglob("*")):
        if file == manifest_path or file.is_dir():
            continue
        relative = str(file.relative_to(folder))
        if file.suffix.lower() in PICKLE_SUFFIXES:
            raise InputError(f"checkpoint {str(folder)!r} holds {relative!r}, a pickle-format file (loading it could "
                             "run code); sensq checkpoints hold safetensors only: refusing to load it")
        if file.is_symlink() or str(folder / relative) not in listed:
            raise InputError(f"checkpoint {str(folder)!r} holds {relative!r}, which its manifest does not list"
                             + (" (a symbolic link)" if file.is_symlink() else "")
                             + "; sensq loads only verified files: remove it or write the checkpoint again")
    if verify:
        for name, info in manifest["files"].items():
            file = inside(folder, name, "file")
            if not file.is_file():
                raise InputError(f"checkpoint file missing: {str(file)!r}")
            if file.stat().st_size != info["bytes"] or file_digest(file, length=64) != info["sha256"]:
                raise InputError(f"checkpoint file {str(file)!r} is corrupted or truncated (SHA-256 mismatch); "
                                 "write the checkpoint again with sensq apply-plan")
    return manifest


def _read_weights(weights_path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        with safe_open(str(weights_path), "pt") as f:
            headers = json.loads((f.metadata() or {}).get("sensq.packed", "{}"))
            # copied into the allocator's own (64-byte aligned) memory: a tensor at the file's offset may be
            # misaligned, and MKL's GEMM rounds differently for misaligned operands (1 ulp), so a full-precision
            # layer would not compute what the same layer of the in-memory model computes
            tensors = {key: f.get_tensor(key).clone() for key in f.keys()}
    except (OSError, ValueError, SafetensorError) as error:  # SafetensorError derives from Exception only
        raise InputError(f"checkpoint file {str(weights_path)!r} cannot be read ({error})") from None
    if not isinstance(headers, dict) or not all(isinstance(h, dict) for h in headers.values()):
        raise InputError(f"checkpoint file {str(weights_path)!r} has malformed packing headers")
    for key, tensor in tensors.items():  # a matching hash says the file is what was written, not that it is sound
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.float() if tensor.element_size() == 1
                                                                    else tensor).all()):
            raise InputError(f"checkpoint file {str(weights_path)!r}: tensor {key!r} holds NaN or Inf; a model with "
                             "non-finite weights generates nothing meaningful: write the checkpoint again")
    return headers, tensors


def _check_packed(packed: PackedTensor) -> None:
    """Every stored field has the size its header implies (a short field would decode garbage)."""
    for field, numel in stored_bytes(packed.fmt, packed.layout).items():
        got = packed.data[field].numel() * packed.data[field].element_size()
        if got != numel:
            raise ValueError(f"field {field!r} holds {got} bytes, the header needs {numel}")


