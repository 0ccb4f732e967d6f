"""Few-step students shipped as LoRAs (e.g. Wan2.2-Lightning): load, fuse, unload, before any hook."""

from __future__ import annotations

from sensq.errors import InputError

_LORA_KEY_PARTS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up", "lora_")


def check_lora_file(path: str, expert: str) -> None:
    """A LoRA must be a safetensors file (never a pickle) holding LoRA weights.

    Raises:
        InputError: not safetensors, or no LoRA keys in it.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError):
        raise InputError(f"--lora-{expert} {str(path)!r} is not a safetensors file (sensq loads LoRAs from "
                         ".safetensors only, never from pickles)") from None
    if not any(part in key for key in keys for part in _LORA_KEY_PARTS):
        raise InputError(f"--lora-{expert} {str(path)!r} holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up "
                         f"keys among its {len(keys)} tensors)")


def fuse_loras(model, *, high: str | None = None, low: str | None = None, scale: float = 1.0) -> None:
    """Fuse a LoRA into each expert and unload the LoRA layers, so that probes and quantization see
    plain ``nn.Linear`` layers holding the student's weights. Records the files in ``model.loras`` and
    refreshes ``model.fingerprint`` (the weights changed), so that a probe, ranking or plan made on the
    student does not match the base model.

    Raises:
        InputError: peft is not installed, or a LoRA does not fit the expert.
    """
    if high is None and low is None:
        return
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        raise InputError("LoRA students need peft: pip install 'sensq[lora]' (or pip install peft)")
    from pathlib import Path

    if model.source_id:
        raise InputError(f"{model.model_id!r} is a quantized checkpoint: LoRAs cannot be fused into packed weights; "
                         "pass them to apply-plan (--lora-high/--lora-low) when writing the checkpoint"
                         + (f" (this one already holds {model.loras})" if model.loras else ""))
    pipe = model.pipe
    for expert, path in (("high", high), ("low", low)):
        if path is None:
            continue
        if not Path(path).is_file():
            raise InputError(f"LoRA file for the {expert}-noise expert not found: {str(path)!r} (a probe or ranking "
                             f"records where its LoRAs were: pass --lora-{expert} with the file's new place)")
        if expert not in model.family.expert_attrs:
            raise InputError(f"--lora-{expert}: this {model.family.name} model has no {expert!r} expert (it has "
                             f"{', '.join(model.family.expert_attrs)}); --lora-high/--lora-low are Wan2.2's experts")
        check_lora_file(path, expert)
        component = model.family.expert_attrs[expert]
        try:
            pipe.load_lora_weights(path, adapter_name=f"sensq_{expert}",
                                   load_into_transformer_2=(component == "transformer_2"))
            pipe.fuse_lora(components=[component], adapter_names=[f"sensq_{expert}"], lora_scale=scale)
        except (ValueError, KeyError, RuntimeError) as error:
            raise InputError(f"cannot apply LoRA {path!r} to the {expert}-noise expert: {error}") from None
    pipe.unload_lora_weights()
    from sensq.models import model_fingerprint

    # absolute paths: probes and rankings record them, and rank/ablate may run from another directory
    model.loras = {**model.loras, **{e: str(Path(p).resolve()) for e, p in (("high", high), ("low", low))
                                      if p is not None}}
    model.fingerprint = model_fingerprint(pipe, model.family)
