"""Backends: which implementation runs a format. The reference is one of them.

Every backend is bit-exact to ``reference`` (tested). ``auto`` picks the fastest backend that is
installed and supports the format and device; because all backends agree bit for bit the choice
never changes a result. A backend asked for by name that cannot run here is an error, never a
silent fallback.
"""

from __future__ import annotations

import enum

import torch

from sensq.errors import BackendUnavailableError
from sensq.formats.spec import Family, FormatSpec


class Backend(enum.Enum):
    AUTO = "auto"
    """The fastest available backend for the tensor's device and format."""
    REFERENCE = "reference"
    """Plain torch, the spec step by step (any device)."""
    CPU = "cpu"
    """Fused numba loops on CPU tensors (HiF4, MXFP4, NVFP4, INT, FP8)."""
    TRITON = "triton"
    """Fused Triton kernels on CUDA tensors (HiF4, MXFP4, NVFP4); CPU tensors under TRITON_INTERPRET=1 (tests)."""


CPU_FAMILIES = (Family.HIF4, Family.MXFP4, Family.NVFP4, Family.INT, Family.FP8)
TRITON_FAMILIES = (Family.HIF4, Family.MXFP4, Family.NVFP4)


def backend_names() -> list[str]:
    return [b.value for b in Backend]


def as_backend(backend: str | Backend) -> Backend:
    if isinstance(backend, Backend):
        return backend
    try:
        return Backend(backend)
    except ValueError:
        raise BackendUnavailableError(
            f"unknown backend {backend!r}; known backends: {', '.join(backend_names())}"
        ) from None


def resolve_backend(backend: str | Backend, spec: FormatSpec, x: torch.Tensor) -> Backend:
    """The concrete backend that will run ``spec`` on ``x``.

    Raises:
        BackendUnavailableError: an explicitly named backend is not installed or cannot run
            this format or device.
    """
    from sensq import kernels  # no import-time work: kernels only checks for packages

    backend = as_backend(backend)
    cpu_ok = x.device.type == "cpu" and spec.family in CPU_FAMILIES
    if backend is Backend.AUTO:
        if x.device.type == "cuda" and spec.family in TRITON_FAMILIES and kernels.triton_available("cuda"):
            return Backend.TRITON
        return Backend.CPU if cpu_ok and kernels.numba_available() else Backend.REFERENCE
    if backend is Backend.TRITON:
        if not kernels.triton_available(x.device.type):
            raise BackendUnavailableError(
                f"backend 'triton' cannot run on this {x.device.type} tensor: it needs triton (pip install "
                "'sensq[triton]') and a CUDA GPU, or TRITON_INTERPRET=1 for CPU tensors; or use backend='reference'"
            )
        if spec.family not in TRITON_FAMILIES:
            raise BackendUnavailableError(
                f"backend 'triton' has no kernel for format {spec.name!r} (it has: "
                f"{', '.join(f.value for f in TRITON_FAMILIES)}); use backend='reference'"
            )
        return backend
    if backend is Backend.CPU:
        if not kernels.numba_available():
            raise BackendUnavailableError(
                "backend 'cpu' needs numba, which is not installed: pip install numba, "
                "or use backend='reference'"
            )
        if spec.family not in CPU_FAMILIES:
            supported = ", ".join(f.value for f in CPU_FAMILIES)
            raise BackendUnavailableError(
                f"backend 'cpu' has no kernel for format {spec.name!r} (it has: {supported}); "
                "use backend='reference'"
            )
        if x.device.type != "cpu":
            raise BackendUnavailableError(
                f"backend 'cpu' runs on CPU tensors; this tensor is on {x.device}. Move it with .cpu() "
                "or use backend='reference'"
            )
    return backend
