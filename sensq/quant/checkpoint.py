"""Quantized checkpoints (``sensq.checkpoint/1``): packed weights in each format's bit layout.

Layout of a checkpoint folder::

    manifest.json                 schema, sensq version, source model, plan, per-layer formats and
                                  calibration factors, file hashes, sizes
    pipeline/                     the rest of the pipeline (text encoder, VAE, tokenizer, scheduler),
                                  saved by diffusers with the two experts left out
    transformer/config.json       the high-noise expert's config
    transformer/weights.safetensors
    transformer_2/...             the same for the low-noise expert

In ``weights.safetensors`` every tensor of the expert's state dict is stored as it is, except the
weights of quantized layers: those are stored packed (HiF4: ``<layer>.weight.blocks``, 36 bytes per
64 values, spec §6; other formats: ``.codes`` and ``.scale``), with the packing headers in the file's
metadata. With ``fake=True`` the quantized weights are stored dequantized instead (a quick
experiment format; same outputs).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import sensq
from sensq.errors import InputError, OutputError
from sensq.formats import PackedTensor, get_format
from sensq.formats.packing import stored_bytes
from sensq.models import LoadedModel, default_resolution, get_family, model_fingerprint, quiet_hf_progress
from sensq.models.family import recorded_family
from sensq.models.layers import quantizable_layers
from sensq.plan import Rule
from sensq.quant.layers import ROTATION_BLOCK, is_quantized, original_module, packed_weight, quantize_module, swap
from sensq.quant.phased import is_phased, phased_layer, step_clock
from sensq.store.files import (
    check_output_folder,
    describe_os_error,
    file_digest,
    inside,
    is_disk_full,
    make_parent,
    output_lock,
    parse_json,
    remove_stale_siblings,
    replace_folder,
    temporary_sibling,
    write_json,
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


def save_quantized(model, out_dir: str | Path, *, plan, calibration: dict, fake: bool = False,
                   lock: bool = True, calibration_source: dict | None = None) -> dict:
    """Write a checkpoint of ``model`` (already quantized in memory by ``quantize_``/calibration).

    Written under a unique hidden temporary folder next to ``out_dir`` and moved into place at the end; an
    existing checkpoint there stays until the new one is complete. ``out_dir`` must be missing, empty or a
    sensq checkpoint: anything else is refused, never deleted. ``lock=False`` when the caller already holds
    the output's lock (:func:`sensq.store.files.output_lock`).

    Returns the manifest.

    Raises:
        OutputError: ``out_dir`` is someone else's folder, a file, unwritable, or being written by another
            sensq command; the disk filled up (the old checkpoint is kept, nothing half-written is left).
    """
    out = check_output_folder(out_dir, "manifest.json", CHECKPOINT_SCHEMA, "checkpoint")
    make_parent(out)
    with output_lock(out) if lock else contextlib.nullcontext():
        remove_stale_siblings(out)
        tmp = temporary_sibling(out, ".tmp")
        tmp.mkdir(parents=True)
        try:
            manifest = _write_checkpoint(model, tmp, plan=plan, calibration=calibration, fake=fake,
                                         calibration_source=calibration_source)
            replace_folder(tmp, out)
        except (OSError, SafetensorError) as error:  # a full disk, most often: nothing half-written is left
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(error, SafetensorError) and not is_disk_full(error):
                raise
            raise OutputError(describe_os_error(error, out)) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return manifest


@dataclass
class _Tally:
    """What the experts written so far hold, for the manifest's sizes."""

    quantized_params: int = 0
    quantized_bytes: int = 0
    bf16_bytes: int = 0
    resident: int = 0


def _write_expert(module: torch.nn.Module, folder: Path, expert: str, calibration: dict, fake: bool,
                  layers_manifest: dict[str, dict], tally: _Tally) -> None:
    """One expert's config and weights file: quantized weights packed (or, ``fake``, dequantized), the rest
    as they are; each quantized layer's formats, clips and calibration go into ``layers_manifest``."""
    folder.mkdir()
    module.save_config(folder)
    tensors: dict[str, torch.Tensor] = {}
    headers: dict[str, dict] = {}
    for key, value in module.state_dict().items():
        tensors[key] = value.detach().contiguous()
        tally.bf16_bytes += value.numel() * 2 if value.is_floating_point() else value.numel() * value.element_size()
        tally.resident += value.numel() * value.element_size()
    for name, layer in quantizable_layers(module):  # a phased layer is one layer: its variants are inside
        if is_phased(layer):
            _write_phased(name, layer, tensors, headers, expert, calibration, layers_manifest, tally)
            continue
        if not is_quantized(layer):
            continue
        layers_manifest[f"{expert}:{name}"] = _layer_entry(layer, expert, name, calibration)
        if layer.weight_format is None:
            continue
        del tensors[f"{name}.weight"]
        if fake:
            weight = layer.weight.detach()
            tensors[f"{name}.weight"] = layer.weight_q.detach().contiguous()
            tally.quantized_params += weight.numel()
            tally.quantized_bytes += weight.numel() * weight.element_size()
            continue
        _store_packed(name, layer, tensors, headers, tally)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"sensq.packed": json.dumps(headers)})


def _layer_entry(layer, expert: str, name: str, calibration: dict) -> dict:
    """A layer's manifest entry: formats, clips, rotation (a quantized layer's; a plain one keeps high precision)
    and its calibration."""
    quantized = is_quantized(layer)
    return {"weight": layer.weight_format.identity if quantized and layer.weight_format else None,
            "activation": layer.act_format.identity if quantized and layer.act_format else None,
            "weight_clip": layer.weight_clip if quantized else 1.0, "act_clip": layer.act_clip if quantized else 1.0,
            **({"rotation": layer.rotation} if quantized and layer.rotation else {}),
            **_calibration_entry(calibration, expert, name)}


def _store_packed(name: str, layer, tensors: dict[str, torch.Tensor], headers: dict[str, dict],
                  tally: _Tally) -> None:
    """A quantized layer's weight as it is deployed (:func:`packed_weight`): its fields, its header, its sizes."""
    packed = packed_weight(layer)
    headers[name] = packed.header() | {"layer_shape": list(layer.weight.shape)}
    for field, value in packed.data.items():
        tensors[f"{name}.weight.{field}"] = value.contiguous()
    tally.quantized_params += layer.weight.numel()
    tally.quantized_bytes += packed.nbytes


def _write_phased(name: str, layer, tensors: dict[str, torch.Tensor], headers: dict[str, dict], expert: str,
                  calibration: dict, layers_manifest: dict[str, dict], tally: _Tally) -> None:
    """A layer whose precision follows the step: its full-precision weight (the steps that run it in high
    precision or in another format need it), its base packed as any quantized layer (the codes a calibration
    chose included), its formats, clips and ranges."""
    base = layer.base
    for key in [k for k in tensors if k.startswith(name + ".")]:
        del tensors[key]
    plain = original_module(base)
    tensors[f"{name}.weight"] = plain.weight.detach().contiguous()
    if plain.bias is not None:
        tensors[f"{name}.bias"] = plain.bias.detach().contiguous()
    if is_quantized(base) and base.weight_format is not None:
        _store_packed(name, base, tensors, headers, tally)
    layers_manifest[f"{expert}:{name}"] = {**_layer_entry(base, expert, name, calibration),
                                           "phases": [dict(phase) for phase in layer.phases]}


def _write_checkpoint(model, tmp: Path, *, plan, calibration: dict, fake: bool,
                      calibration_source: dict | None = None) -> dict:
    pipe, adapter = model.pipe, model.adapter
    layers_manifest: dict[str, dict] = {}
    files: dict[str, dict] = {}
    tally = _Tally()
    experts = {}
    for expert in adapter.experts(pipe):
        attr = adapter.expert_attrs[expert]
        experts[expert] = attr
        _write_expert(adapter.expert_module(pipe, expert), tmp / attr, expert, calibration, fake, layers_manifest,
                      tally)
    saved = {attr: getattr(pipe, attr) for attr in adapter.expert_attrs.values()}
    try:
        pipe.register_modules(**{attr: None for attr in saved})
        with quiet_hf_progress(), _diffusers_errors_only():  # not "transformer=None cannot be saved": by design
            pipe.save_pretrained(tmp / "pipeline")
    finally:
        pipe.register_modules(**saved)
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            files[str(path.relative_to(tmp))] = {"sha256": file_digest(path, length=64), "bytes": path.stat().st_size}
    disk = sum(f["bytes"] for f in files.values())
    sizes = CheckpointSizes(
        disk_bytes=disk, weight_bytes_bf16=tally.bf16_bytes, quantized_params=tally.quantized_params,
        quantized_weight_bytes=tally.quantized_bytes,
        effective_bits_quantized=8 * tally.quantized_bytes / tally.quantized_params if tally.quantized_params else 0.0,
        resident_weight_bytes_simulation=tally.resident,
    )
    manifest = {
        "schema": CHECKPOINT_SCHEMA, "version": CHECKPOINT_VERSION, "sensq_version": sensq.__version__,
        "family": adapter.name, "packed": not fake,
        "source_model": {"id": model.model_id, "fingerprint": model.fingerprint, "loras": dict(model.loras),
                         "source_id": model.source_id},
        "experts": experts, "layers": layers_manifest,
        "plan": plan.to_dict(), "files": files, "sizes": sizes.__dict__,
        **({"calibration": calibration_source} if calibration_source else {}),
    }
    write_json(tmp / "manifest.json", manifest)
    return manifest


@contextlib.contextmanager
def _diffusers_errors_only():
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _calibration_entry(calibration: dict, expert: str, name: str) -> dict:
    calib = calibration.get(expert, {}).get(name)
    return {} if calib is None else calib.manifest_entry()


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


def load_quantized(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """Load a checkpoint folder into a runnable pipeline with the quantized layers in place.

    Returns a :class:`sensq.models.LoadedModel`. Packed weights become deployed layers
    (:mod:`sensq.quant.deployed`) built straight from the file's packed tensors: the dense weight of a
    quantized layer is never materialized, and it is never re-quantized (HiF4 is not idempotent), so
    outputs equal the in-memory quantized model's bit for bit. A ``fake`` checkpoint (dequantized weights)
    loads as simulation layers.
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    adapter = recorded_family(manifest.get("family"))
    experts = {}
    for expert, attr in manifest["experts"].items():
        if expert not in adapter.expert_attrs or adapter.expert_attrs[expert] != attr:
            raise InputError(f"checkpoint {str(folder)!r} names expert {expert!r} -> {attr!r}; this model family has "
                             + ", ".join(f"{e} -> {a}" for e, a in adapter.expert_attrs.items()))
        experts[attr] = _load_expert(folder, manifest, expert, attr, adapter)
    with quiet_hf_progress():
        pipe = adapter.pipeline_type().from_pretrained(str(folder / "pipeline"), use_safetensors=True,
                                                       local_files_only=True, **experts)
    pipe.to(device=device)
    stored = _main_dtype(next(iter(experts.values())))
    if dtype is not None and dtype != stored:
        raise InputError(f"this checkpoint holds {stored} weights; load it without --dtype or write another "
                         f"checkpoint in {dtype}")
    pipe.set_progress_bar_config(disable=True)
    phased = [m for module in experts.values() for m in module.modules() if is_phased(m)]
    if phased:
        clock = step_clock(pipe, adapter)
        for layer in phased:
            layer.clock = clock
    source = manifest.get("source_model", {})
    return LoadedModel(pipe, adapter, str(folder), model_fingerprint(pipe, adapter), default_resolution(pipe, adapter),
                       torch.device(device), stored, loras=source.get("loras", {}),
                       source_id=source.get("source_id") or source.get("id", ""))


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


def _load_expert(folder: Path, manifest: dict, expert: str, attr: str, family) -> torch.nn.Module:
    """One expert: built on the meta device from its config (the family's transformer class), packed layers
    deployed from their packed tensors, the rest of the state dict assigned, then the simulation layers of
    unpacked entries."""
    from accelerate import init_empty_weights

    from sensq.quant.deployed import PackedLinear, PackedPatchConv3d

    transformer_type = family.transformer_type()
    config = transformer_type.load_config(str(folder / attr))
    with init_empty_weights(include_buffers=False):
        module = transformer_type.from_config(config)
    headers, tensors = _read_weights(folder / attr / WEIGHTS_FILE)
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    entries = {qualified.partition(":")[2]: entry for qualified, entry in manifest["layers"].items()
               if qualified.partition(":")[0] == expert}
    deployed = set()
    # a packed layer with step ranges also keeps its full-precision weight: set aside for its other variants
    full_weights = {name: tensors.pop(f"{name}.weight") for name, entry in entries.items()
                    if "phases" in entry and name in headers and f"{name}.weight" in tensors}
    originals: dict[str, torch.nn.Module] = {}
    for name, header in headers.items():
        where = f"checkpoint {str(folder)!r}: {expert}:{name}"
        if f"{name}.weight" not in expected:
            raise InputError(f"checkpoint {str(folder)!r} packs a weight for {expert}:{name}, a layer its config "
                             "does not have")
        shape = tuple(header.get("layer_shape", ()))
        if shape != expected[f"{name}.weight"]:
            raise InputError(f"checkpoint {str(folder)!r} packs {expert}:{name} as {list(shape)} but its config "
                             f"needs {list(expected[f'{name}.weight'])}")
        entry = entries.get(name)
        if entry is None:
            raise InputError(f"{where} is packed but the manifest does not list it")
        prefix = f"{name}.weight."
        data = {key[len(prefix):]: tensors.pop(key) for key in list(tensors) if key.startswith(prefix)}
        try:
            packed = PackedTensor.from_header(header, data)
            _check_packed(packed)
            listed = get_format(entry["weight"]).identity if entry["weight"] is not None else None
        except (KeyError, ValueError, TypeError, RuntimeError) as error:
            raise InputError(f"{where}: the packed weight does not fit its header ({error})") from None
        if packed.fmt.identity != listed:
            raise InputError(f"{where} is packed as {packed.fmt.identity} but the manifest says {listed}; the "
                             "checkpoint is inconsistent: write it again")
        bias = tensors.pop(f"{name}.bias", None)
        if (bias is None) != (f"{name}.bias" not in expected):
            which = "missing" if bias is None else "unexpected"
            raise InputError(f"checkpoint {str(folder)!r} does not fit its config: {which} ['{name}.bias']")
        if bias is not None and tuple(bias.shape) != expected[f"{name}.bias"]:
            raise InputError(f"checkpoint {str(folder)!r} holds {attr}.{name}.bias as {list(bias.shape)} but its "
                             f"config needs {list(expected[f'{name}.bias'])}")
        kwargs = {"act_clip": entry["act_clip"], "weight_clip": entry["weight_clip"]}
        layer = module.get_submodule(name)
        rotation = _rotation(entry, where, layer)
        if isinstance(layer, torch.nn.Conv3d):
            flat = PackedTensor(packed.fmt, (shape[0], int(torch.tensor(shape[1:]).prod())), 1, packed.dtype,
                                packed.data)
            new = PackedPatchConv3d.from_packed(flat, bias, entry["activation"], conv_shape=shape,
                                                kernel_size=layer.kernel_size, **kwargs)
        else:
            new = PackedLinear.from_packed(packed, bias, entry["activation"], rotation=rotation, **kwargs)
        originals[name] = swap(module, name, new)
        deployed.add(name)
    for key, tensor in tensors.items():
        if key in expected and tuple(tensor.shape) != expected[key]:
            raise InputError(f"checkpoint {str(folder)!r} holds {attr}.{key} as {list(tensor.shape)} but its "
                             f"config needs {list(expected[key])}")
    missing, unexpected = module.load_state_dict(tensors, strict=False, assign=True)
    missing = [key for key in missing if key.rpartition(".")[0] not in deployed]
    if missing or unexpected:
        raise InputError(f"checkpoint {str(folder)!r} does not fit its config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for name, entry in entries.items():
        if name in deployed and "phases" in entry:
            swap(module, name, _load_phased(folder, expert, name, module.get_submodule(name), entry,
                                            _plain(originals[name], full_weights, name, folder, expert)))
            continue
        if name in deployed:
            continue
        try:
            layer = module.get_submodule(name)
        except AttributeError:
            raise InputError(f"checkpoint {str(folder)!r} lists layer '{expert}:{name}', which its config does not "
                             "have") from None
        if "phases" in entry:
            swap(module, name, _load_phased(folder, expert, name, layer, entry))
            continue
        if entry["weight"] is not None and manifest.get("packed", True):
            raise InputError(f"checkpoint {str(folder)!r}: {expert}:{name} is quantized to {entry['weight']} but its "
                             "packed weight is missing; write the checkpoint again")
        # a fake checkpoint stores the dequantized weight: use it as is (never re-quantize)
        weight_q = layer.weight.detach() if entry["weight"] is not None else None
        swap(module, name, quantize_module(layer, entry["weight"], entry["activation"], act_clip=entry["act_clip"],
                                           weight_clip=entry["weight_clip"], weight_q=weight_q,
                                           rotation=_rotation(entry, f"checkpoint {str(folder)!r}: {expert}:{name}",
                                                              layer)))
    return module.eval()


def _rotation(entry: dict, where: str, layer: torch.nn.Module) -> int | None:
    """The manifest's rotation of a layer: none, or sensq's block on a Linear whose width it divides."""
    rotation = entry.get("rotation")
    if rotation is None:
        return None
    width = layer.weight[0].numel() if hasattr(layer, "weight") else 0
    if rotation != ROTATION_BLOCK or not isinstance(layer, torch.nn.Linear) or width % ROTATION_BLOCK:
        raise InputError(f"{where} has rotation {rotation!r}; sensq rotates Linear layers in blocks of "
                         f"{ROTATION_BLOCK} only: write the checkpoint again")
    return rotation


def _plain(layer: torch.nn.Module, full_weights: dict, name: str, folder: Path, expert: str) -> torch.nn.Module:
    """The full-precision layer of a packed layer with step ranges: its module from the config, given the stored
    full-precision weight and the deployed layer's bias."""
    weight = full_weights.get(name)
    if weight is None or tuple(weight.shape) != tuple(layer.weight.shape):
        raise InputError(f"checkpoint {str(folder)!r}: {expert}:{name} has step ranges but no full-precision weight of "
                         f"shape {list(layer.weight.shape)}; write the checkpoint again")
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    return layer


def _load_phased(folder: Path, expert: str, name: str, layer: torch.nn.Module, entry: dict,
                 plain: torch.nn.Module | None = None) -> torch.nn.Module:
    """A layer stored with step ranges: its base (deployed from its packed weight, or rebuilt by its formats' rule
    from the full-precision weight when it holds none), the variants as apply-plan makes them; the step clock
    is attached once the pipeline exists. ``plain``: the full-precision layer beside a deployed base."""
    phases = entry["phases"]
    try:
        if not isinstance(phases, list) or not phases:
            raise ValueError("'phases' must be a non-empty list")
        for phase in phases:
            for key in ("weight", "activation"):
                if phase.get(key) is not None:
                    get_format(phase[key])
            Rule(name, phase.get("weight"), phase.get("activation"), steps=phase.get("steps"),
                 sigma=phase.get("sigma"))
            if ("steps" in phase) == ("sigma" in phase):
                raise ValueError("each phase needs one of 'steps' or 'sigma'")
    except (InputError, ValueError, TypeError, AttributeError, KeyError) as error:
        raise InputError(f"checkpoint {str(folder)!r}: {expert}:{name} has malformed step ranges ({error})") from None
    base = layer
    if plain is not None:
        plain.bias = layer.bias  # the deployed layer holds the bias
    elif entry["weight"] is not None or entry["activation"] is not None:
        base = quantize_module(layer, entry["weight"], entry["activation"], act_clip=entry["act_clip"],
                               weight_clip=entry["weight_clip"],
                               rotation=_rotation(entry, f"checkpoint {str(folder)!r}: {expert}:{name}", layer))
    row = {"weight": entry["weight"], "activation": entry["activation"],
           "phases": [{"weight": p.get("weight"), "activation": p.get("activation"),
                       **({"steps": p["steps"]} if "steps" in p else {"sigma": p["sigma"]})} for p in phases]}
    return phased_layer(base, row, None, plain=plain)


def _check_packed(packed: PackedTensor) -> None:
    """Every stored field has the size its header implies (a short field would decode garbage)."""
    for field, numel in stored_bytes(packed.fmt, packed.layout).items():
        got = packed.data[field].numel() * packed.data[field].element_size()
        if got != numel:
            raise ValueError(f"field {field!r} holds {got} bytes, the header needs {numel}")


def _main_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype most of a module's parameters have: diffusers keeps a few small modules of a bf16 Wan
    expert in float32 (time embedder, norms), so the first parameter does not tell the checkpoint's dtype."""
    counts: dict[torch.dtype, int] = {}
    for parameter in module.parameters():
        counts[parameter.dtype] = counts.get(parameter.dtype, 0) + parameter.numel()
    return max(counts, key=counts.__getitem__)
