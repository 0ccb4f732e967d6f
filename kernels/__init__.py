"""Fast backends for sensq's formats, installed as ``sensq.kernels``.

Importing this package does no work: availability is checked on demand, and each kernel module
is imported only when a backend that needs it runs. Every kernel cites the reference function
in ``sensq.formats.reference`` it must match bit for bit.
"""

from __future__ import annotations

import importlib.util
import os


def numba_available() -> bool:
    """True when the ``cpu`` backend (numba) can run."""
    return importlib.util.find_spec("numba") is not None


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
