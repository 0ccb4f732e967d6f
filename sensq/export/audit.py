"""``sensq audit``: is a downloaded ComfyUI or GGUF file sound, and what does it cost?

Reads a quantized checkpoint in ComfyUI's ``comfy_quant`` layouts or GGUF (made by anyone, sensq included),
names each layer's format, dequantizes it with the target's own code (comfy-kitchen's layouts; gguf's
dequantizer) and compares it with the same layer of the BF16 source model: per-layer NMSE, and that NMSE
over what sensq's nearest format loses on the same weight (``ratio``). A crossed convention (nibble order,
a scale stored inverted or transposed, a layer under another layer's name) shows as a ratio far above 1;
the format's own rounding does not. The layers kept in high precision are listed too, and the whole choice
can be written as a sensq plan (each quantized layer in sensq's nearest format) that ``sensq ablate --plans``
measures end to end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sensq.errors import InputError
from sensq.export.target import nmse
from sensq.models.layers import quantizable_layers

SUSPECT_RATIO = 10.0
"""A layer whose NMSE exceeds this many times the nearest sensq format's is reported as suspect."""

COMFY_NEAREST = {"nvfp4": "nvfp4_ts", "int8_tensorwise": "int8", "float8_e4m3fn": "fp8_e4m3_tensor",
                 "float8_e5m2": "fp8_e4m3", "mxfp8": "mxfp8"}
"""ComfyUI format -> the sensq format whose error on the same weight is the yardstick (``awq_w4a16``: int4@G)."""


@dataclass
class AuditedLayer:
    key: str
    name: str
    fmt: str
    nearest: str | None
    nmse: float
    expected: float | None
    ratio: float | None
    suspect: bool


@dataclass
class Audit:
    file: str
    kind: str
    expert: str
    quantized: list[AuditedLayer] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"file": self.file, "kind": self.kind, "expert": self.expert,
                "quantized": [vars(layer) for layer in self.quantized], "kept": self.kept, "unknown": self.unknown,
                "suspect": [layer.key for layer in self.quantized if layer.suspect]}


def _diffusers_names(keys: list[str]) -> dict[str, str]:
    """Wan key -> diffusers key, by diffusers' own converter (the real mapping, not sensq's idea of it)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted = convert_wan_transformer_to_diffusers({key: index for index, key in enumerate(keys)})
    return {keys[index]: name for name, index in converted.items()}


def _comfy_layers(path: Path) -> tuple[dict[str, tuple[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """{layer key: (format, dequantized weight)} by comfy-kitchen's layouts, and every other tensor by key."""
    from safetensors.torch import load_file

    try:
        from comfy_kitchen.tensor import (
            TensorCoreAWQW4A16Layout,
            TensorCoreFP8Layout,
            TensorCoreMXFP8Layout,
            TensorCoreNVFP4Layout,
            TensorWiseINT8Layout,
        )
    except ImportError:
        raise InputError("auditing a ComfyUI file reads it with comfy-kitchen: pip install -e '.[deploy]'") from None
    from safetensors import SafetensorError

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{str(path)!r} is neither a GGUF nor a readable safetensors file ({error})") from None
    layers, plain = {}, {}
    tagged = {key[: -len(".comfy_quant")] for key in state if key.endswith(".comfy_quant")}
    for key in tagged:
        try:
            tag = json.loads(bytes(state[f"{key}.comfy_quant"].tolist()).decode())
            fmt = tag["format"]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{str(path)!r}: {key}.comfy_quant is not the JSON ComfyUI writes") from None
        q = state[f"{key}.weight"]
        scale = state.get(f"{key}.weight_scale")
        rows = q.shape[0]
        columns = q.shape[1] * (2 if fmt in ("nvfp4", "awq_w4a16") else 1)
        shape, dtype = (rows, columns), torch.float32
        if fmt == "nvfp4":
            params = TensorCoreNVFP4Layout.Params(scale=state[f"{key}.weight_scale_2"], orig_dtype=dtype,
                                                  orig_shape=shape, block_scale=scale)
            weight = TensorCoreNVFP4Layout.dequantize(q, params)
        elif fmt == "int8_tensorwise":
            weight = TensorWiseINT8Layout.dequantize(q, TensorWiseINT8Layout.Params(scale, dtype, shape))
        elif fmt == "awq_w4a16":
            group = int(tag.get("group_size", 64))
            fmt = f"awq_w4a16@{group}"
            params = TensorCoreAWQW4A16Layout.Params(scale=scale.float(), orig_dtype=dtype, orig_shape=shape,
                                                     zeros=state[f"{key}.weight_zeros"].float(), group_size=group)
            weight = TensorCoreAWQW4A16Layout.dequantize(q, params)
        elif fmt in ("float8_e4m3fn", "float8_e5m2"):
            weight = TensorCoreFP8Layout.dequantize(q, TensorCoreFP8Layout.Params(scale, dtype, shape))
        elif fmt == "mxfp8":
            if scale.dtype == torch.uint8:  # how shared files store E8M0 (ComfyUI reads it as E8M0)
                scale = scale.view(torch.float8_e8m0fnu)
            weight = TensorCoreMXFP8Layout.dequantize(q, TensorCoreMXFP8Layout.Params(scale, dtype, shape))
        else:
            raise InputError(f"{str(path)!r}: {key} has ComfyUI format {fmt!r}, which sensq audit does not read yet")
        layers[key] = (fmt, weight.float())
    for key, value in state.items():
        if not any(key.startswith(prefix + ".") for prefix in tagged):
            plain[key] = value
    return layers, plain


def _gguf_layers(path: Path) -> tuple[dict[str, tuple[str, torch.Tensor]], dict[str, torch.Tensor]]:
    try:
        import gguf
    except ImportError:
        raise InputError("auditing a GGUF file reads it with gguf: pip install -e '.[deploy]'") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as error:  # noqa: BLE001 (gguf raises ValueError, struct.error, IndexError on a damaged file)
        raise InputError(f"{str(path)!r} is not a readable GGUF file ({type(error).__name__}: {error})") from None
    kept_types = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    layers, plain = {}, {}
    for tensor in reader.tensors:
        values = torch.from_numpy(np.ascontiguousarray(
            gguf.quants.dequantize(tensor.data, tensor.tensor_type)).astype(np.float32))
        key = tensor.name[: -len(".weight")] if tensor.name.endswith(".weight") else tensor.name
        if tensor.tensor_type in kept_types:
            plain[tensor.name] = values
        else:
            layers[key] = (tensor.tensor_type.name, values)
    return layers, plain


def _nearest_error(fmt: str, weight: torch.Tensor) -> tuple[str | None, float | None]:
    """The sensq format that stands for ``fmt`` and its NMSE on ``weight`` (scaled by 4 per bit for GGUF types
    of fewer than 4 bits), the yardstick of a layer's error."""
    from sensq.formats import get_format, quantize_dequantize

    bits_below_four = 0
    if fmt.startswith("awq_w4a16@"):
        nearest = f"int4@{fmt.split('@')[1]}"
    elif fmt in COMFY_NEAREST:
        nearest = COMFY_NEAREST[fmt]
    elif fmt in ("Q4_K", "Q6_K") and weight.shape[-1] % 256 == 0:
        nearest = fmt.lower()  # GGUF's own K-quant, registered in sensq: the file's format itself
    elif fmt.startswith("Q8"):
        nearest = "int8@32"
    elif fmt.startswith(("Q4", "Q5", "Q6", "IQ4")):
        nearest = "int4@32"
    elif fmt.startswith(("Q3", "IQ3")):
        nearest, bits_below_four = "int4@32", 1
    elif fmt.startswith(("Q2", "IQ2", "IQ1", "TQ")):
        nearest, bits_below_four = "int4@32", 2
    else:
        return None, None
    if weight.shape[-1] % 32 and nearest.endswith("@32"):
        return nearest, None
    return nearest, nmse(quantize_dequantize(weight.float(), get_format(nearest)), weight) * 4.0 ** bits_below_four


def audit_file(path: str | Path, source, expert: str) -> Audit:
    """Audit one expert's file against ``source`` (a :class:`sensq.models.LoadedModel`, the BF16 original)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {str(path)!r}")
    with open(path, "rb") as f:
        head = f.read(4)
    kind = "gguf" if head == b"GGUF" else "comfyui"
    layers, plain = _gguf_layers(path) if kind == "gguf" else _comfy_layers(path)
    experts = source.family.experts(source.pipe)
    if expert not in experts:
        raise InputError(f"--expert {expert!r} is not an expert of {source.model_id!r} ({', '.join(experts)})")
    reference = source.family.expert_module(source.pipe, expert).state_dict()
    names = _diffusers_names([f"{key}.weight" for key in layers] + list(plain))
    result = Audit(str(path), kind, expert)
    for key, (fmt, weight) in sorted(layers.items()):
        name = names[f"{key}.weight"]
        if name not in reference:
            result.unknown.append(key)
            continue
        original = reference[name].float()
        if weight.numel() != original.numel():
            raise InputError(f"{str(path)!r}: {key} holds {weight.numel()} values, the source's {name} "
                             f"{original.numel()}: the file is not of this model")
        weight = weight.reshape(original.shape)
        error = nmse(weight, original)
        nearest, expected = _nearest_error(fmt, original.reshape(original.shape[0], -1))
        ratio = None if not expected else error / expected
        result.quantized.append(AuditedLayer(key, name.removesuffix(".weight"), fmt, nearest, error, expected, ratio,
                                             ratio is not None and ratio > SUSPECT_RATIO))
    quantized_names = {layer.name for layer in result.quantized}
    module = source.family.expert_module(source.pipe, expert)
    result.kept = [name for name, _ in quantizable_layers(module) if name not in quantized_names]
    result.unknown += [key for key, name in names.items() if name not in reference and key in plain]
    return result


def audit_plan(audits: list[Audit], source):
    """The files' choice as one sensq plan: each quantized layer in its nearest sensq format (weight-only for
    the weight-only targets: GGUF and AWQ), every other layer kept."""
    from sensq.plan import Plan, Rule

    rules = []
    for audit in audits:
        for layer in audit.quantized:
            if layer.nearest is None:
                raise InputError(f"{layer.key}: no sensq format stands for {layer.fmt}; the plan cannot be written")
            weight_only = audit.kind == "gguf" or layer.fmt.startswith("awq")
            rules.append(Rule(f"{audit.expert}:{layer.name}", layer.nearest, None if weight_only else layer.nearest,
                              why=f"{layer.fmt} in {Path(audit.file).name}"))
    rules.append(Rule("re:.*", None, None, why="not quantized in the audited file(s)"))
    return Plan(rules, model={"id": source.model_id, "fingerprint": source.fingerprint,
                              "family": source.family.name},
                source={"audited": [audit.file for audit in audits]})
