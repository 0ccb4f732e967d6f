"""Reports: rendered files (PNG, Markdown, self-contained HTML) from sensq's JSON outputs."""

from __future__ import annotations

import io
from pathlib import Path

from sensq.errors import InputError
from sensq.store.files import atomic_write_bytes


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or one clear error when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise InputError("sensq report needs matplotlib: pip install 'sensq[report]' (or pip install matplotlib)") \
            from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """Save a figure as PNG, atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
