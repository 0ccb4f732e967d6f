"""Writing a checkpoint: under a temporary sibling folder, moved into place when complete."""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import sensq
from sensq.errors import OutputError
from sensq.models import quiet_hf_progress
from sensq.models.layers import quantizable_layers
from sensq.plan import LayerConfig
from sensq.quant.checkpoint.manifest import (
    CHECKPOINT_SCHEMA,
    CHECKPOINT_VERSION,
    WEIGHTS_FILE,
    CheckpointSizes,
    ManifestLayer,
)
from sensq.quant.layers import is_quantized, original_module, packed_weight
from sensq.quant.phased import is_phased
from sensq.store.files import (
    check_output_folder,
    describe_os_error,
    file_digest,
    is_disk_full,
    make_parent,
    output_lock,
    remove_stale_siblings,
    replace_folder,
    temporary_sibling,
    write_json,
)


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


def _layer_entry(layer, expert: str, name: str, calibration: dict, step_ranges: tuple = ()) -> dict:
    """A layer's manifest entry: its :class:`ManifestLayer` (formats, clips and rotation of a quantized layer; a
    plain one keeps high precision; its step ranges) and its calibration's record."""
    quantized = is_quantized(layer)
    config = LayerConfig(expert, name, layer.weight_format.identity if quantized and layer.weight_format else None,
                         layer.act_format.identity if quantized and layer.act_format else None,
                         step_ranges=step_ranges)
    entry = ManifestLayer(config, layer.weight_clip if quantized else 1.0, layer.act_clip if quantized else 1.0,
                          layer.rotation if quantized else None)
    return {**entry.to_entry(), **_calibration_entry(calibration, expert, name)}


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
    layers_manifest[f"{expert}:{name}"] = _layer_entry(base, expert, name, calibration, layer.step_ranges)


def _write_checkpoint(model, tmp: Path, *, plan, calibration: dict, fake: bool,
                      calibration_source: dict | None = None) -> dict:
    pipe, family = model.pipe, model.family
    layers_manifest: dict[str, dict] = {}
    files: dict[str, dict] = {}
    tally = _Tally()
    experts = {}
    for expert in family.experts(pipe):
        attr = family.expert_attrs[expert]
        experts[expert] = attr
        _write_expert(family.expert_module(pipe, expert), tmp / attr, expert, calibration, fake, layers_manifest,
                      tally)
    saved = {attr: getattr(pipe, attr) for attr in family.expert_attrs.values()}
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
        "family": family.name, "packed": not fake,
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


