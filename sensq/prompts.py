"""Prompt files: plain text, JSON lists, OpenS2V records, VBench prompt lists. Indices are kept."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sensq.errors import InputError

DEFAULT_PROMPTS = (
    "a red ball moving left on a dark blue background",
    "a cat walking on a beach at sunset, camera tracking shot",
    "a city street at night in the rain, cars passing by",
    "a small bird flying over a green forest, slow motion",
)
"""Used when no ``--prompts`` file is given (for models outside the procedural world)."""

PROCEDURAL_PROMPTS = tuple(
    f"a {colour} {shape} moving {direction} on a {background} background"
    for colour, shape, direction, background in (
        ("red", "circle", "left", "dark"), ("green", "square", "right", "gray"), ("blue", "triangle", "up", "dark"),
        ("yellow", "circle", "down", "gray"), ("white", "square", "left", "dark"), ("red", "triangle", "right", "gray"),
        ("green", "circle", "up", "dark"), ("blue", "square", "down", "gray"), ("yellow", "triangle", "left", "dark"),
        ("white", "circle", "right", "gray"), ("red", "square", "up", "gray"), ("green", "triangle", "down", "dark"),
        ("blue", "circle", "left", "gray"), ("yellow", "square", "right", "dark"), ("white", "triangle", "up", "gray"),
        ("red", "circle", "down", "dark"),
    )
)
"""The default prompts of the procedural-world model (``tiny-trained``): every colour, shape, direction
and background appears."""


@dataclass(frozen=True)
class Prompt:
    """One prompt. ``index`` is its position in the source file (0-based) and never changes."""

    index: int
    text: str
    negative: str = ""


def _from_record(record: dict, position: int, path: Path) -> Prompt:
    # OpenS2V: prefer face_cap_qwen, else cap[0]; VBench full info: prompt_en; generic: prompt / text
    for key in ("face_cap_qwen", "prompt_en", "prompt", "text"):
        if isinstance(record.get(key), str) and record[key].strip():
            text = record[key]
            break
    else:
        cap = record.get("cap")
        if isinstance(cap, list) and cap and isinstance(cap[0], str):
            text = cap[0]
        elif isinstance(cap, str):
            text = cap
        else:
            raise InputError(
                f"{str(path)!r}: record {position} has none of face_cap_qwen, cap, prompt_en, prompt, text"
            )
    negative = record.get("negative_prompt") or ""
    return Prompt(position, text.strip(), negative)


def load_prompts(path: str | Path | None, limit: int | None = None, *, procedural: bool = False) -> list[Prompt]:
    """Read prompts; ``None`` gives :data:`DEFAULT_PROMPTS` (:data:`PROCEDURAL_PROMPTS` with ``procedural``).

    Formats: ``.txt`` (one prompt per line; blank lines skipped, indices count non-blank lines),
    ``.json`` with a list of strings, a list of records (OpenS2V: ``face_cap_qwen`` else ``cap[0]``;
    VBench: ``prompt_en``), or a dict ``{dimension: [prompts]}`` (VBench per-dimension lists,
    concatenated in file order).

    Raises:
        InputError: missing, unreadable, empty or malformed file; ``limit`` below 1.
    """
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    if path is None:
        prompts = [Prompt(i, text) for i, text in enumerate(PROCEDURAL_PROMPTS if procedural else DEFAULT_PROMPTS)]
        return prompts[:limit]
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt file not found: {str(path)!r}")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read prompt file {str(path)!r}: {error}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as error:
            raise InputError(f"{str(path)!r} is not valid JSON: {error}") from None
        if isinstance(data, dict):
            if not all(isinstance(v, list) for v in data.values()):
                raise InputError(f"{str(path)!r}: a JSON object must map dimension names to lists of prompts")
            data = [item for items in data.values() for item in items]
        if not isinstance(data, list):
            raise InputError(f"{str(path)!r}: expected a JSON list of prompts or records")
        prompts = []
        for position, item in enumerate(data):
            if isinstance(item, str):
                prompts.append(Prompt(position, item.strip()))
            elif isinstance(item, dict):
                prompts.append(_from_record(item, position, path))
            else:
                raise InputError(f"{str(path)!r}: item {position} is a {type(item).__name__}, not a prompt")
    else:
        lines = [line.strip() for line in raw.splitlines()]
        prompts = [Prompt(i, text) for i, text in enumerate(line for line in lines if line)]
    if not prompts:
        raise InputError(f"prompt file {str(path)!r} holds no prompts")
    return prompts[:limit]
