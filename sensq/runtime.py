"""Device and dtype defaults: the GPU when one is present, else the CPU; bf16 on GPU, fp32 on CPU."""

from __future__ import annotations

import os
import sys

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


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; a container's or taskset's limit included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None = None) -> int:
    """Give torch and numba (the CPU kernels) the same number of threads: ``threads``, or by default the CPUs
    this process may use. Left to themselves each sizes its own pool to the machine, and the two pools then
    compete for the same cores (measured: a per-layer e2e ranking over 6x slower on 2 shared cores).

    Raises:
        InputError: fewer than one thread.
    """
    threads = available_cpus() if threads is None else threads
    if threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    numba = sys.modules.get("numba")
    if numba is None:
        # not imported yet (a command that never quantizes need not pay for it): numba sizes its pool from
        # NUMBA_NUM_THREADS when it is imported; a value the user set stays the upper bound
        limit = os.environ.get("NUMBA_NUM_THREADS", "")
        os.environ["NUMBA_NUM_THREADS"] = str(min(threads, int(limit)) if limit.isdigit() and int(limit) else threads)
    else:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return threads


def threads_in_use() -> int:
    return torch.get_num_threads()
