"""``sensq export``: a sensq checkpoint as the files ComfyUI and ComfyUI-GGUF load, holding what sensq measured.

One file per expert (``high``, ``low``; ``main`` for one-expert models), in the original Wan key names
(:mod:`sensq.export.wan_names`). A quantized layer keeps sensq's own codes where the target's layout can
hold them (ComfyUI: NVFP4 from ``nvfp4_ts``, INT8 per channel; GGUF: Q4_0 from ``int4@32``, Q8_0 from
``int8@32``, whose FP16 block scale re-rounds sensq's FP32 one: the report gives each such layer's NMSE
against sensq's deployed weight, computed by the target's own dequantizer); a layer kept in high precision
is written in the dtype sensq ran it in. A format the target has no layout for is refused in one line that
names the nearest one it has and how to plan for it: nothing is converted in silence.

A target is one module with a :class:`~sensq.export.target.Target` registered in :data:`TARGETS`
(:func:`register_target`), imported here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sensq.errors import InputError
from sensq.export import comfyui, gguf  # noqa: F401 (each registers its target)
from sensq.export.target import TARGETS, Layer, Target, Written, register_target
from sensq.export.wan_names import wan_name
from sensq.formats.packing import unpack
from sensq.models.family import recorded_family

__all__ = ["TARGETS", "Layer", "Target", "Written", "register_target", "export_checkpoint"]

EXPORT_SCHEMA = "sensq.export/1"
REPORT = "export.json"
WAN_FAMILIES = ("wan2.2-t2v-a14b", "wan-t2v")


def _expert_layers(module: torch.nn.Module) -> tuple[list[Layer], dict[str, torch.Tensor]]:
    """The deployed layers (packed weights) of an expert and every other tensor of its state, by diffusers key."""
    from sensq.quant.deployed import is_deployed
    from sensq.quant.layers import QuantLinear, QuantPatchConv3d
    from sensq.quant.phased import is_phased

    layers, prefixes = [], []
    for name, sub in module.named_modules():
        if is_phased(sub):
            raise InputError(f"layer {name!r} follows a step range: ComfyUI and GGUF run a layer the same at every "
                             "step; export a plan without --protect-steps")
        if isinstance(sub, (QuantLinear, QuantPatchConv3d)) and sub.weight_format is not None:
            raise InputError("this is a fake-quant checkpoint (dequantized weights): export needs the packed codes; "
                             "write it with sensq apply-plan without --fake")
        if is_deployed(sub):
            if getattr(sub, "rotation", None):
                raise InputError(f"layer {name!r} is Hadamard-rotated (calibration rotate): ComfyUI and GGUF do "
                                 "not rotate activations; export a plan calibrated without rotate")
            packed = sub.packed()
            weight = unpack(packed)
            layers.append(Layer(name, wan_name(name), packed, weight.reshape(weight.shape[0], -1), sub.bias,
                                tuple(getattr(sub, "conv_shape", packed.shape))))
            prefixes.append(name + ".")
    plain = {key: value for key, value in module.state_dict().items()
             if not any(key.startswith(prefix) for prefix in prefixes)}
    return layers, plain


@dataclass
class ExportResult:
    out: str
    target: str
    files: dict[str, str]
    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def export_checkpoint(checkpoint: str | Path, target_name: str, out: str | Path,
                      progress: Callable[[str, int, int], None] | None = None) -> ExportResult:
    """Write one ``target`` file per expert of the sensq checkpoint folder into ``out`` and ``export.json`` (the
    per-layer report).

    Raises:
        InputError: not a checkpoint, a model family other than Wan, a fake-quant checkpoint, step ranges,
            rotations, or a format the target has no layout for (nothing is written then).
        OutputError: ``out`` is someone else's folder, unwritable, or being written by another sensq command.
    """
    from sensq.quant.checkpoint import is_checkpoint, load_quantized, read_manifest
    from sensq.store.files import check_output_folder, claim_output_folder, make_parent, output_lock, write_json

    if target_name not in TARGETS:
        raise InputError(f"unknown export target {target_name!r}; use one of {', '.join(TARGETS)}")
    target = TARGETS[target_name]
    checkpoint = Path(checkpoint)
    if not is_checkpoint(checkpoint):
        raise InputError(f"{str(checkpoint)!r} is not a sensq checkpoint (no manifest.json): write one with sensq "
                         "apply-plan")
    manifest = read_manifest(checkpoint, verify=False)  # its family, before any work; load_quantized verifies
    family = recorded_family(manifest.get("family")).name
    if family not in WAN_FAMILIES:
        raise InputError(f"sensq export writes Wan checkpoints; {str(checkpoint)!r} is a {family} model")
    out = check_output_folder(out, REPORT, EXPORT_SCHEMA, "export folder")
    started = time.perf_counter()
    model = load_quantized(checkpoint)
    experts = model.family.experts(model.pipe)
    planned: dict[str, tuple[list, dict]] = {}
    for expert in experts:  # every layer is laid out before anything is written: a refusal leaves no file
        layers, plain = _expert_layers(model.family.expert_module(model.pipe, expert))
        written = []
        for position, layer in enumerate(layers):
            try:
                written.append(target.layer(layer))
            except InputError as error:
                raise InputError(f"{expert}:{layer.name}: {error}") from None
            if progress is not None:
                progress(f"lay out {expert}", position + 1, len(layers))
        planned[expert] = (list(zip(layers, written, strict=True)), plain)
    make_parent(out)
    result = ExportResult(str(out), target.name, {})
    with output_lock(out):
        out = claim_output_folder(out, REPORT, EXPORT_SCHEMA, "export folder")
        for expert, (pairs, plain) in planned.items():
            tensors = {wan_name(key): value for key, value in plain.items()}
            for layer, written in pairs:
                tensors.update(written.tensors)
                if layer.bias is not None:
                    tensors[f"{layer.wan}.bias"] = layer.bias.detach()
                result.layers.append({"expert": expert, "layer": layer.name, "key": layer.wan,
                                      "sensq_format": layer.packed.fmt.identity, "target_type": written.kind,
                                      "codes_kept": written.codes_kept, "nmse_vs_sensq": written.nmse,
                                      "note": written.note})
            path = out / f"{expert}{target.suffix}"
            target.write(path, tensors, family)
            result.files[expert] = path.name
        result.seconds = round(time.perf_counter() - started, 2)
        write_json(out / REPORT, {"schema": EXPORT_SCHEMA, "checkpoint": str(checkpoint), "target": target.name,
                                  "family": family, "files": result.files, "layers": result.layers,
                                  "kept_in_high_precision": "every layer not listed, in the dtype sensq ran it in",
                                  "seconds": result.seconds})
    return result


def summary_json(result: ExportResult) -> str:
    return json.dumps({"out": result.out, "target": result.target, "files": result.files,
                       "layers": result.layers, "seconds": result.seconds}, indent=1)
