"""Fast backends for sensq's formats, installed as ``sensq.kernels``.

Importing this package does no work: availability is checked on demand, and each kernel module
is imported only when a backend that needs it runs. Every kernel cites the reference function
in ``sensq.formats.reference`` it must match bit for bit.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def _yield_to_the_pypi_kernels() -> None:
    """Run from a clone's root, ``import kernels`` finds this folder before the PyPI package ``kernels``
    (Hugging Face's kernel hub, which transformers imports on a CUDA machine). Imported under that
    top-level name, this module puts the installed package in its place; without one it stays itself."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        origin = distribution("kernels").locate_file("kernels/__init__.py")
    except PackageNotFoundError:
        return
    if not os.path.isfile(origin) or os.path.samefile(origin, __file__):
        return
    spec = importlib.util.spec_from_file_location("kernels", origin,
                                                  submodule_search_locations=[os.path.dirname(origin)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the import system returns what sys.modules holds once this file ran
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _yield_to_the_pypi_kernels()


def numba_available() -> bool:
    """True when the ``cpu`` backend (numba) can run."""
    return importlib.util.find_spec("numba") is not None


def _numba_runs_on(device_type: str) -> bool:
    return device_type == "cpu" and numba_available()


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available(device_type: str = "cuda") -> bool:
    """True when the ``triton`` backend can run on tensors of ``device_type``: triton is installed and
    either the tensor is on a CUDA GPU or the interpreter is on (CPU tensors)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device_type == "cuda":
        import torch

        return torch.cuda.is_available()
    return device_type == "cpu" and triton_interpreted()


def register() -> None:
    """Fill ``sensq.formats``' kernel registry (the ``sensq.kernels`` entry point, setup.cfg): which
    function implements which op of which format family on which backend. Nothing is imported here;
    each module loads on its kernel's first call."""
    from sensq.formats.backend import Backend, register_backend, register_kernel
    from sensq.formats.spec import Family

    register_backend(Backend.CPU, _numba_runs_on)
    register_backend(Backend.TRITON, triton_available)
    register_kernel(Backend.CPU, Family.HIF4, "quantize_dequantize", "sensq.kernels.numba_hif4:quantize_dequantize")
    register_kernel(Backend.CPU, Family.HIF4, "unpack", "sensq.kernels.numba_hif4:unpack_hif4")
    for family in (Family.MXFP4, Family.NVFP4, Family.INT, Family.FP8):
        register_kernel(Backend.CPU, family, "quantize_dequantize", "sensq.kernels.numba_blocks:quantize_dequantize")
    register_kernel(Backend.TRITON, Family.HIF4, "quantize_dequantize", "sensq.kernels.triton_hif4:quantize_dequantize")
    register_kernel(Backend.TRITON, Family.HIF4, "pack", "sensq.kernels.triton_hif4:pack_blocks")
    register_kernel(Backend.TRITON, Family.HIF4, "linear", "sensq.kernels.triton_hif4:hif4_linear")
    for family in (Family.MXFP4, Family.NVFP4):
        register_kernel(Backend.TRITON, family, "quantize_dequantize", "sensq.kernels.triton_fp4:quantize_dequantize")
        register_kernel(Backend.TRITON, family, "encode", "sensq.kernels.triton_fp4:encode_fields")
