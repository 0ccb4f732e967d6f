"""Prompt files: plain text, JSON lists, OpenS2V records, VBench prompt lists. Indices are kept."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
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
    """One prompt. ``index`` is its position in the source file (0-based) and never changes.

    ``key`` is the prompt's id in a keyed source (an OpenS2V sample id such as ``singleobj_3``, an
    OpenS2V-5M clip key), ``""`` otherwise. ``meta`` holds what the source says about it: ``type``
    (OpenS2V-Eval category), ``dimension`` (VBench full info: the dimensions it serves),
    ``aesthetic``/``motion``/``tech`` (OpenS2V-5M scores), ``class_label``, ``source_index`` (its index
    in the file a filtered file was made from).
    """

    index: int
    text: str
    negative: str = ""
    key: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False, repr=False)


META_KEYS = ("type", "dimension", "aesthetic", "motion", "tech", "class_label", "synthesis_flag", "source_index")
"""Record fields kept in :attr:`Prompt.meta` (read from the record or its ``metadata`` object)."""

_EVAL_ID = re.compile(r"^([A-Za-z]+)_\d+$")  # OpenS2V-Eval sample ids: singleobj_1, multiobject_30, ...


def _from_record(record: dict, position: int, path: Path, key: str = "") -> Prompt:
    # OpenS2V-5M nests its fields under "metadata"; OpenS2V-Eval and our own files keep them at the top
    fields = {**record.get("metadata", {}), **record} if isinstance(record.get("metadata"), dict) else record
    # OpenS2V: prefer face_cap_qwen, else cap[0]; VBench full info: prompt_en; generic: prompt / text
    for name in ("face_cap_qwen", "prompt_en", "prompt", "text"):
        if isinstance(fields.get(name), str) and fields[name].strip():
            text = fields[name]
            break
    else:
        cap = fields.get("cap")
        if isinstance(cap, list) and cap and isinstance(cap[0], str):
            text = cap[0]
        elif isinstance(cap, str):
            text = cap
        else:
            raise InputError(
                f"{str(path)!r}: record {key or position} has none of face_cap_qwen, cap, prompt_en, prompt, text"
            )
    key = key or str(fields.get("key") or "")
    meta = {name: fields[name] for name in META_KEYS if fields.get(name) is not None}
    if "type" not in meta and (match := _EVAL_ID.match(key)):
        meta["type"] = match.group(1)
    return Prompt(position, text.strip(), fields.get("negative_prompt") or "", key, meta)


def load_prompts(path: str | Path | None, limit: int | None = None, *, procedural: bool = False) -> list[Prompt]:
    """Read prompts; ``None`` gives :data:`DEFAULT_PROMPTS` (:data:`PROCEDURAL_PROMPTS` with ``procedural``).

    Formats: ``.txt`` (one prompt per line; blank lines skipped, indices count non-blank lines);
    an empty string in a JSON list is refused (its index would name no prompt);
    ``.json`` with a list of strings, a list of records (OpenS2V-5M: ``face_cap_qwen`` else
    ``cap[0]``, also under ``metadata``; VBench full info: ``prompt_en``; generic: ``prompt``/``text``),
    a dict ``{dimension: [prompts]}`` (VBench per-dimension lists, concatenated in file order) or a
    dict ``{id: record}`` (OpenS2V-Eval ``{"singleobj_1": {"prompt": ...}}``, OpenS2V-5M
    ``{clip: {"metadata": {...}}}``; the id becomes :attr:`Prompt.key`); ``.jsonl`` with one record or
    string per line.

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
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        prompts = _from_json(raw, path, suffix == ".jsonl")
    else:
        lines = [line.strip() for line in raw.splitlines()]
        prompts = [Prompt(i, text) for i, text in enumerate(line for line in lines if line)]
    if not prompts:
        raise InputError(f"prompt file {str(path)!r} holds no prompts")
    return prompts[:limit]


def _from_json(raw: str, path: Path, lines: bool) -> list[Prompt]:
    try:
        if lines:
            data = [json.loads(line) for line in raw.splitlines() if line.strip()]
        else:
            data = json.loads(raw)
    except json.JSONDecodeError as error:
        raise InputError(f"{str(path)!r} is not valid JSON: {error}") from None
    keys = None
    if isinstance(data, dict):
        if data and all(isinstance(v, dict) for v in data.values()):
            keys = list(data)  # OpenS2V: {sample id: record}
            data = list(data.values())
        elif all(isinstance(v, list) for v in data.values()):
            data = [item for items in data.values() for item in items]
        else:
            raise InputError(f"{str(path)!r}: a JSON object must map dimension names to lists of prompts "
                             "(VBench) or ids to records (OpenS2V)")
    if not isinstance(data, list):
        raise InputError(f"{str(path)!r}: expected a JSON list of prompts or records")
    prompts = []
    for position, item in enumerate(data):
        if isinstance(item, str):
            if not item.strip():  # an index would point at nothing: refused, not skipped (a .txt skips blank lines)
                raise InputError(f"{str(path)!r}: item {position} is an empty prompt")
            prompts.append(Prompt(position, item.strip()))
        elif isinstance(item, dict):
            prompts.append(_from_record(item, position, path, keys[position] if keys else ""))
        else:
            raise InputError(f"{str(path)!r}: item {position} is a {type(item).__name__}, not a prompt")
    return prompts


@dataclass(frozen=True)
class PromptFilter:
    """Which prompts of a source to keep (``sensq prompts``). Steps run in field order; ``None``/empty skips one.

    ``types``/``exclude_types`` select OpenS2V-Eval categories (the id's prefix: ``singleobj``,
    ``humanobj``, ...); ``dimensions`` keeps VBench full-info prompts that serve any of these VBench
    dimensions; ``min_words``/``max_words`` bound the length; ``min_aesthetic``/``min_motion``/
    ``min_tech`` threshold OpenS2V-5M's scores; ``exclude`` drops texts matching a regex
    (case-insensitive); ``dedupe`` drops repeats (case and spacing ignored); ``per_type`` keeps the
    first N of each type; ``sample`` then draws N at random with ``seed`` (kept in file order).
    """

    types: tuple[str, ...] = ()
    exclude_types: tuple[str, ...] = ()
    dimensions: tuple[str, ...] = ()
    min_words: int | None = None
    max_words: int | None = None
    min_aesthetic: float | None = None
    min_motion: float | None = None
    min_tech: float | None = None
    exclude: str | None = None
    dedupe: bool = False
    per_type: int | None = None
    sample: int | None = None
    seed: int = 0


def filter_prompts(prompts: list[Prompt], spec: PromptFilter) -> tuple[list[Prompt], dict[str, int]]:
    """Apply ``spec``; returns the kept prompts (their original indices untouched) and, per reason, how many
    were dropped.

    Raises:
        InputError: a type or score filter the source cannot answer (no prompt has a type, or some lack
            the score), a bad regex, a count below 1.
    """
    for name in ("min_words", "max_words", "per_type", "sample"):
        if getattr(spec, name) is not None and getattr(spec, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(spec, name)}")
    kept = _Kept(list(prompts))
    _by_metadata(kept, spec, prompts)
    _by_text(kept, spec)
    _by_count(kept, spec)
    return kept.prompts, kept.dropped


@dataclass
class _Kept:
    """The prompts still kept, and how many each reason dropped so far."""

    prompts: list[Prompt]
    dropped: dict[str, int] = field(default_factory=dict)

    def keep(self, reason: str, test) -> None:
        before = len(self.prompts)
        self.prompts = [p for p in self.prompts if test(p)]
        if before > len(self.prompts):
            self.dropped[reason] = self.dropped.get(reason, 0) + before - len(self.prompts)


def _by_metadata(kept: _Kept, spec: PromptFilter, prompts: list[Prompt]) -> None:
    """OpenS2V-Eval types and VBench dimensions."""
    if spec.types or spec.exclude_types or spec.per_type:
        if not any("type" in p.meta for p in prompts):
            raise InputError("the prompt file has no types (OpenS2V-Eval ids such as 'singleobj_1' give them); "
                             "drop --type/--exclude-type/--per-type")
    if spec.types:
        kept.keep(f"type not in {','.join(spec.types)}", lambda p: p.meta.get("type") in spec.types)
    if spec.exclude_types:
        kept.keep(f"type in {','.join(spec.exclude_types)}", lambda p: p.meta.get("type") not in spec.exclude_types)
    if spec.dimensions:
        if not any("dimension" in p.meta for p in prompts):
            raise InputError("the prompt file has no VBench dimensions (VBench_full_info.json records have them); "
                             "drop --dimension")
        kept.keep(f"no dimension in {','.join(spec.dimensions)}",
                  lambda p: bool(set(p.meta.get("dimension") or ()) & set(spec.dimensions)))


def _by_text(kept: _Kept, spec: PromptFilter) -> None:
    """Word counts, OpenS2V-5M scores and the --exclude regex."""
    if spec.min_words:
        kept.keep(f"fewer than {spec.min_words} words", lambda p: len(p.text.split()) >= spec.min_words)
    if spec.max_words:
        kept.keep(f"more than {spec.max_words} words", lambda p: len(p.text.split()) <= spec.max_words)
    for score in ("aesthetic", "motion", "tech"):
        threshold = getattr(spec, f"min_{score}")
        if threshold is None:
            continue
        lacking = sum(not isinstance(p.meta.get(score), int | float) for p in kept.prompts)
        if lacking:
            raise InputError(f"--min-{score}: {lacking} of {len(kept.prompts)} prompts have no {score!r} score "
                             "(OpenS2V-5M metadata has one; OpenS2V-Eval and plain lists do not)")
        kept.keep(f"{score} < {threshold:g}", lambda p, s=score, t=threshold: p.meta[s] >= t)
    if spec.exclude:
        try:
            pattern = re.compile(spec.exclude, re.IGNORECASE)
        except re.error as error:
            raise InputError(f"--exclude {spec.exclude!r} is not a valid regex: {error}") from None
        kept.keep(f"matches {spec.exclude!r}", lambda p: not pattern.search(p.text))


def _by_count(kept: _Kept, spec: PromptFilter) -> None:
    """Duplicates, at most --per-type per type, and a seeded --sample of what is left."""
    if spec.dedupe:
        seen: set[str] = set()

        def first(p: Prompt) -> bool:
            norm = " ".join(p.text.lower().split())
            return not (norm in seen or seen.add(norm))

        kept.keep("duplicate", first)
    if spec.per_type:
        count: dict[str, int] = {}

        def within(p: Prompt) -> bool:
            count[p.meta.get("type")] = count.get(p.meta.get("type"), 0) + 1
            return count[p.meta.get("type")] <= spec.per_type

        kept.keep(f"beyond {spec.per_type} per type", within)
    if spec.sample and spec.sample < len(kept.prompts):
        chosen = set(random.Random(spec.seed).sample(range(len(kept.prompts)), spec.sample))
        positions = {id(p): i for i, p in enumerate(kept.prompts)}
        kept.keep(f"not in the {spec.sample} sampled", lambda p: positions[id(p)] in chosen)


def is_written_prompt_file(path: str | Path) -> bool:
    """True for a prompt file :func:`write_prompts` wrote (a JSON list of records with ``source_index``)."""
    try:
        records = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(records, list) and all(isinstance(r, dict) and "prompt" in r and "source_index" in r
                                             for r in records)


def write_prompts(path: str | Path, prompts: list[Prompt]) -> None:
    """Write ``prompts`` atomically as a JSON list of records that :func:`load_prompts` (and any JSON reader)
    reads back: ``prompt``, ``negative_prompt`` when set, ``key`` when set, ``source_index`` (the index in
    the first file of a chain of filters) and their :attr:`Prompt.meta`. Positions in this file are the new indices."""
    from sensq.store.files import atomic_write_bytes

    records = []
    for p in prompts:
        record = {"prompt": p.text}
        if p.negative:
            record["negative_prompt"] = p.negative
        if p.key:
            record["key"] = p.key
        records.append({**record, **p.meta, "source_index": p.meta.get("source_index", p.index)})
    atomic_write_bytes(path, (json.dumps(records, indent=1, ensure_ascii=False) + "\n").encode())
