"""Backends: which implementation runs a format. The reference is one of them.

Every backend is bit-exact to ``reference`` (tested). ``auto`` picks the fastest backend that is
installed and supports the format and device; because all backends agree bit for bit the choice
never changes a result. A backend asked for by name that cannot run here is an error, never a
silent fallback.

The fast backends are a registry, ``{(backend, format family, op): kernel}``, that the kernels fill:
this package names no kernel module. A kernel package registers through the ``sensq.kernels`` entry
point (sensq's own, ``sensq.kernels:register``, is declared in setup.cfg); the registrations are read
on the first query. Which families a backend runs, and whether it can run on a device, come from what
was registered, never from a list kept by hand here.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

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


OPS = {
    "quantize_dequantize": "(x, spec, dim) -> x rounded to the format along dim, x's dtype",
    "unpack": "(blocks [rows, n_blocks, 36] uint8, out [rows, length]) -> out, HiF4 decoded",
    "pack": "(x, dim) -> [rows, n_blocks, 36] uint8, HiF4 blocks along dim",
    "encode": "(x, spec, dim) -> (codes [rows, n_blocks, block] uint8, scale codes [rows, n_blocks] uint8, "
              "tensor scale float): the reference encoding of an E2M1 format",
    "linear": "(x, blocks, bias, out_features) -> x @ W.T + bias, HiF4 W4A4",
}
"""The operations a kernel may implement, with their signatures."""


@dataclass(frozen=True)
class Kernel:
    """One registered kernel: ``target`` (``"module:function"``) is imported on its first call, so that
    registering costs nothing (numba and triton compile on import)."""

    backend: Backend
    family: Family
    op: str
    target: str

    def load(self) -> Callable:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


_KERNELS: dict[tuple[Backend, Family, str], Kernel] = {}
_AVAILABLE: dict[Backend, Callable[[str], bool]] = {}
_LOADED = False


def register_kernel(backend: Backend, family: Family, op: str, target: str) -> None:
    """Declare that ``target`` implements ``op`` (see :data:`OPS`) of ``family`` on ``backend``."""
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; ops: {', '.join(OPS)}")
    _KERNELS[(backend, family, op)] = Kernel(backend, family, op, target)


def register_backend(backend: Backend, available: Callable[[str], bool]) -> None:
    """Declare how to tell whether ``backend`` can run on tensors of a device type here."""
    _AVAILABLE[backend] = available


def _registry() -> dict[tuple[Backend, Family, str], Kernel]:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for point in entry_points(group="sensq.kernels"):
            point.load()()
    return _KERNELS


def families(backend: Backend, op: str = "quantize_dequantize") -> frozenset[Family]:
    """The format families ``backend`` has a kernel for (``op``)."""
    return frozenset(family for (b, family, o) in _registry() if b is backend and o == op)


def available(backend: Backend, device_type: str) -> bool:
    """Whether ``backend``'s kernels can run on ``device_type`` tensors here (installed, device present)."""
    _registry()
    check = _AVAILABLE.get(backend)
    return check is not None and check(device_type)


def find_kernel(backend: Backend, family: Family, op: str, device_type: str) -> Callable | None:
    """The kernel for ``op`` of ``family`` on ``backend`` if one is registered and can run on
    ``device_type``; else None."""
    entry = _registry().get((backend, family, op))
    return entry.load() if entry is not None and available(backend, device_type) else None


def kernel(backend: Backend, family: Family, op: str) -> Callable:
    """The registered kernel (its availability is the caller's to check, see :func:`resolve_backend`).

    Raises:
        BackendUnavailableError: none registered (sensq not installed, so its entry point is missing).
    """
    entry = _registry().get((backend, family, op))
    if entry is None:
        raise BackendUnavailableError(f"no {backend.value} kernel registered for {op} of {family.value}: is sensq "
                                      "installed (pip install -e .)? its kernels register through an entry point")
    return entry.load()


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


def _kernel_family(spec: FormatSpec):
    """The family whose kernels may run ``spec`` (None: the reference codec only, e.g. a registered format)."""
    from sensq.formats.spec import codec_of

    return spec.family if codec_of(spec).kernels else None


def resolve_backend(backend: str | Backend, spec: FormatSpec, x: torch.Tensor) -> Backend:
    """The concrete backend that will run ``spec`` on ``x``.

    Raises:
        BackendUnavailableError: an explicitly named backend is not installed or cannot run
            this format or device.
    """
    backend = as_backend(backend)
    cpu_ok = x.device.type == "cpu" and _kernel_family(spec) in families(Backend.CPU)
    if backend is Backend.AUTO:
        triton_ok = _kernel_family(spec) in families(Backend.TRITON)
        if x.device.type == "cuda" and triton_ok and available(Backend.TRITON, "cuda"):
            return Backend.TRITON
        return Backend.CPU if cpu_ok and available(Backend.CPU, "cpu") else Backend.REFERENCE
    if backend is Backend.TRITON:
        if not available(Backend.TRITON, x.device.type):
            raise BackendUnavailableError(
                f"backend 'triton' cannot run on this {x.device.type} tensor: it needs triton (pip install "
                "'sensq[triton]') and a CUDA GPU, or TRITON_INTERPRET=1 for CPU tensors; or use backend='reference'"
            )
        if _kernel_family(spec) not in families(Backend.TRITON):
            raise BackendUnavailableError(
                f"backend 'triton' has no kernel for format {spec.name!r} (it has: "
                f"{_names(families(Backend.TRITON))}); use backend='reference'"
            )
        return backend
    if backend is Backend.CPU:
        if not available(Backend.CPU, "cpu"):
            raise BackendUnavailableError(
                "backend 'cpu' needs numba, which is not installed: pip install numba, "
                "or use backend='reference'"
            )
        if _kernel_family(spec) not in families(Backend.CPU):
            supported = _names(families(Backend.CPU))
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


def _names(found: frozenset[Family]) -> str:
    return ", ".join(sorted(f.value for f in found))
