"""Device and dtype defaults: the GPU when one is present, else the CPU; bf16 on GPU, fp32 on CPU."""

from __future__ import annotations

import torch

from sensq.errors import InputError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> ``cuda`` when available, else ``cpu``.

    Raises:
        InputError: an unknown device string, or CUDA asked for without a GPU.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but no CUDA GPU is available here; use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise InputError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if resolved.type not in ("cpu", "cuda", "meta"):
        backend = getattr(torch, resolved.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise InputError(f"device {device!r} is not available in this torch build; use cpu"
                             + (" or cuda" if torch.cuda.is_available() else ""))
    if resolved.type == "meta":
        raise InputError("--device meta holds no data and cannot run a model; use cpu or cuda")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` -> bf16 on GPU, fp32 on CPU.

    Raises:
        InputError: a dtype name sensq does not run models in.
    """
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None
