"""Reports: rendered files (PNG, Markdown, self-contained HTML) from sensq's JSON outputs."""

from __future__ import annotations

import base64
import html
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


def embedded_png(path: Path) -> str:
    """An ``<img>`` tag carrying the PNG itself (base64), so the page needs no other file."""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def html_page(title: str, body: str) -> str:
    """A self-contained HTML page with sensq's report style."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}td{white-space:nowrap}"
            "td.wrap{white-space:normal;min-width:7em}pre{white-space:pre-wrap;overflow-wrap:anywhere}"
            "img{max-width:100%;display:block;"
            f"margin:1em 0}}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def save_png(fig, path: Path) -> None:
    """Save a figure as PNG, atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
