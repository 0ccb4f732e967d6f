"""Fast backends for sensq's formats, installed as ``sensq.kernels``.

Importing this package does no work: availability is checked on demand, and each kernel module
is imported only when a backend that needs it runs. Every kernel cites the reference function
in ``sensq.formats.reference`` it must match bit for bit.
"""

from __future__ import annotations

import importlib.util


def numba_available() -> bool:
    """True when the ``cpu`` backend (numba) can run."""
    return importlib.util.find_spec("numba") is not None
