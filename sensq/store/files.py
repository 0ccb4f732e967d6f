"""Small file helpers every sensq output uses: atomic writes and schema-checked JSON documents."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sensq.errors import InputError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: str | Path, data: dict) -> None:
    """Atomically write ``data`` as indented JSON (NaN/inf allowed, as Python's json writes them)."""
    atomic_write_bytes(path, json.dumps(data, indent=1, allow_nan=True).encode())


def read_json(path: str | Path, schema: str, kind: str) -> dict:
    """Read a sensq JSON document and check its ``schema``.

    Raises:
        InputError: missing file, invalid JSON, or another schema (the message names ``kind``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{kind} file not found: {str(path)!r}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or data.get("schema") != schema:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{str(path)!r} has schema {found!r}; expected {schema!r}")
    return data


def file_digest(path: str | Path, length: int = 16) -> str:
    """SHA-256 of a file's bytes (hex, first ``length`` digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]
