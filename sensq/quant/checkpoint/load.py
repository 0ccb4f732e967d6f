"""Loading a checkpoint: each expert built on the meta device from its config, packed layers deployed from
their stored codes (never re-quantized), step ranges and rotations rebuilt from the manifest."""

from __future__ import annotations

from pathlib import Path

import torch

from sensq.errors import InputError
from sensq.formats import PackedTensor, get_format
from sensq.models import LoadedModel, default_resolution, model_fingerprint, quiet_hf_progress
from sensq.models.family import recorded_family
from sensq.quant.checkpoint.manifest import (
    WEIGHTS_FILE,
    ManifestLayer,
    _check_packed,
    _read_weights,
    read_manifest,
)
from sensq.quant.layers import ROTATION_BLOCK, quantize_module, swap
from sensq.quant.phased import is_phased, phased_layer, step_clock


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
    family = recorded_family(manifest.get("family"))
    experts = {}
    for expert, attr in manifest["experts"].items():
        if expert not in family.expert_attrs or family.expert_attrs[expert] != attr:
            raise InputError(f"checkpoint {str(folder)!r} names expert {expert!r} -> {attr!r}; this model family has "
                             + ", ".join(f"{e} -> {a}" for e, a in family.expert_attrs.items()))
        experts[attr] = _load_expert(folder, manifest, expert, attr, family)
    with quiet_hf_progress():
        pipe = family.pipeline_type().from_pretrained(str(folder / "pipeline"), use_safetensors=True,
                                                       local_files_only=True, **experts)
    pipe.to(device=device)
    stored = _main_dtype(next(iter(experts.values())))
    if dtype is not None and dtype != stored:
        raise InputError(f"this checkpoint holds {stored} weights; load it without --dtype or write another "
                         f"checkpoint in {dtype}")
    pipe.set_progress_bar_config(disable=True)
    phased = [m for module in experts.values() for m in module.modules() if is_phased(m)]
    if phased:
        clock = step_clock(pipe, family)
        for layer in phased:
            layer.clock = clock
    source = manifest.get("source_model", {})
    return LoadedModel(pipe, family, str(folder), model_fingerprint(pipe, family), default_resolution(pipe, family),
                       torch.device(device), stored, loras=source.get("loras", {}),
                       source_id=source.get("source_id") or source.get("id", ""))


def _load_expert(folder: Path, manifest: dict, expert: str, attr: str, family) -> torch.nn.Module:
    """One expert: built on the meta device from its config (the family's transformer class), packed layers
    deployed from their packed tensors, the rest of the state dict assigned, then the simulation layers of
    unpacked entries."""
    from accelerate import init_empty_weights

    transformer_type = family.transformer_type()
    config = transformer_type.load_config(str(folder / attr))
    with init_empty_weights(include_buffers=False):
        module = transformer_type.from_config(config)
    headers, tensors = _read_weights(folder / attr / WEIGHTS_FILE)
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    where = f"checkpoint {str(folder)!r}"
    entries = {qualified.partition(":")[2]: ManifestLayer.from_entry(qualified, entry, where)
               for qualified, entry in manifest["layers"].items() if qualified.partition(":")[0] == expert}
    # a packed layer with step ranges also keeps its full-precision weight: set aside for its other variants
    full_weights = {name: tensors.pop(f"{name}.weight") for name, entry in entries.items()
                    if entry.config.step_ranges and name in headers and f"{name}.weight" in tensors}
    originals: dict[str, torch.nn.Module] = {}
    for name, header in headers.items():
        originals[name] = _deploy_packed(module, folder, expert, attr, name, header, entries.get(name), tensors,
                                         expected)
    for key, tensor in tensors.items():
        if key in expected and tuple(tensor.shape) != expected[key]:
            raise InputError(f"checkpoint {str(folder)!r} holds {attr}.{key} as {list(tensor.shape)} but its "
                             f"config needs {list(expected[key])}")
    missing, unexpected = module.load_state_dict(tensors, strict=False, assign=True)
    missing = [key for key in missing if key.rpartition(".")[0] not in originals]
    if missing or unexpected:
        raise InputError(f"checkpoint {str(folder)!r} does not fit its config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for name, entry in entries.items():
        if name in originals and entry.config.step_ranges:
            swap(module, name, _load_phased(folder, expert, name, module.get_submodule(name), entry,
                                            _plain(originals[name], full_weights, name, folder, expert)))
        elif name not in originals:
            _load_unpacked(module, folder, manifest, expert, name, entry)
    return module.eval()


def _deploy_packed(module, folder: Path, expert: str, attr: str, name: str, header: dict, entry: ManifestLayer | None,
                   tensors: dict, expected: dict) -> torch.nn.Module:
    """Swap layer ``name`` of ``module`` for the deployed layer of its packed tensors (taken out of ``tensors``),
    after checking them against the config and the manifest; returns the layer it replaced."""
    from sensq.quant.deployed import PackedLinear, PackedPatchConv3d

    where = f"checkpoint {str(folder)!r}: {expert}:{name}"
    if f"{name}.weight" not in expected:
        raise InputError(f"checkpoint {str(folder)!r} packs a weight for {expert}:{name}, a layer its config "
                         "does not have")
    shape = tuple(header.get("layer_shape", ()))
    if shape != expected[f"{name}.weight"]:
        raise InputError(f"checkpoint {str(folder)!r} packs {expert}:{name} as {list(shape)} but its config "
                         f"needs {list(expected[f'{name}.weight'])}")
    if entry is None:
        raise InputError(f"{where} is packed but the manifest does not list it")
    packed = _packed_of(where, name, header, entry, tensors)
    bias = tensors.pop(f"{name}.bias", None)
    if (bias is None) != (f"{name}.bias" not in expected):
        which = "missing" if bias is None else "unexpected"
        raise InputError(f"checkpoint {str(folder)!r} does not fit its config: {which} ['{name}.bias']")
    if bias is not None and tuple(bias.shape) != expected[f"{name}.bias"]:
        raise InputError(f"checkpoint {str(folder)!r} holds {attr}.{name}.bias as {list(bias.shape)} but its "
                         f"config needs {list(expected[f'{name}.bias'])}")
    kwargs = {"act_clip": entry.act_clip, "weight_clip": entry.weight_clip}
    layer = module.get_submodule(name)
    rotation = _rotation(entry, where, layer)
    if isinstance(layer, torch.nn.Conv3d):
        flat = PackedTensor(packed.fmt, (shape[0], int(torch.tensor(shape[1:]).prod())), 1, packed.dtype,
                            packed.data)
        new = PackedPatchConv3d.from_packed(flat, bias, entry.config.activation, conv_shape=shape,
                                            kernel_size=layer.kernel_size, **kwargs)
    else:
        new = PackedLinear.from_packed(packed, bias, entry.config.activation, rotation=rotation, **kwargs)
    return swap(module, name, new)


def _packed_of(where: str, name: str, header: dict, entry: ManifestLayer, tensors: dict) -> PackedTensor:
    """Layer ``name``'s packed weight from its fields in ``tensors`` (taken out), checked against its header and
    the manifest's format."""
    prefix = f"{name}.weight."
    data = {key[len(prefix):]: tensors.pop(key) for key in list(tensors) if key.startswith(prefix)}
    try:
        packed = PackedTensor.from_header(header, data)
        _check_packed(packed)
        listed = get_format(entry.config.weight).identity if entry.config.weight is not None else None
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise InputError(f"{where}: the packed weight does not fit its header ({error})") from None
    if packed.fmt.identity != listed:
        raise InputError(f"{where} is packed as {packed.fmt.identity} but the manifest says {listed}; the "
                         "checkpoint is inconsistent: write it again")
    return packed


def _load_unpacked(module, folder: Path, manifest: dict, expert: str, name: str, entry: ManifestLayer) -> None:
    """A manifest layer without packed tensors: step ranges around a plain layer, or a fake checkpoint's
    simulation layer (its stored weight is the dequantized one: used as is, never re-quantized)."""
    try:
        layer = module.get_submodule(name)
    except AttributeError:
        raise InputError(f"checkpoint {str(folder)!r} lists layer '{expert}:{name}', which its config does not "
                         "have") from None
    config = entry.config
    if config.step_ranges:
        swap(module, name, _load_phased(folder, expert, name, layer, entry))
        return
    if config.weight is not None and manifest.get("packed", True):
        raise InputError(f"checkpoint {str(folder)!r}: {expert}:{name} is quantized to {config.weight} but its "
                         "packed weight is missing; write the checkpoint again")
    weight_q = layer.weight.detach() if config.weight is not None else None
    swap(module, name, quantize_module(layer, config.weight, config.activation, act_clip=entry.act_clip,
                                       weight_clip=entry.weight_clip, weight_q=weight_q,
                                       rotation=_rotation(entry, f"checkpoint {str(folder)!r}: {expert}:{name}",
                                                          layer)))


def _rotation(entry: ManifestLayer, where: str, layer: torch.nn.Module) -> int | None:
    """The manifest's rotation of a layer: none, or sensq's block on a Linear whose width it divides."""
    rotation = entry.rotation
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


def _load_phased(folder: Path, expert: str, name: str, layer: torch.nn.Module, entry: ManifestLayer,
                 plain: torch.nn.Module | None = None) -> torch.nn.Module:
    """A layer stored with step ranges: its base (deployed from its packed weight, or rebuilt by its formats' rule
    from the full-precision weight when it holds none), the variants as apply-plan makes them; the step clock
    is attached once the pipeline exists. ``plain``: the full-precision layer beside a deployed base."""
    config = entry.config
    base = layer
    if plain is not None:
        plain.bias = layer.bias  # the deployed layer holds the bias
    elif config.quantized:
        base = quantize_module(layer, config.weight, config.activation, act_clip=entry.act_clip,
                               weight_clip=entry.weight_clip,
                               rotation=_rotation(entry, f"checkpoint {str(folder)!r}: {expert}:{name}", layer))
    return phased_layer(base, config, None, plain=plain)


def _main_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype most of a module's parameters have: diffusers keeps a few small modules of a bf16 Wan
    expert in float32 (time embedder, norms), so the first parameter does not tell the checkpoint's dtype."""
    counts: dict[torch.dtype, int] = {}
    for parameter in module.parameters():
        counts[parameter.dtype] = counts.get(parameter.dtype, 0) + parameter.numel()
    return max(counts, key=counts.__getitem__)
