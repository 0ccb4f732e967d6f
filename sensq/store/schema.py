"""A small validator for the JSON documents sensq reads (rankings, plans, manifests): each reader
declares its fields once and gets one clear line for a document of the right kind but the wrong
shape, instead of a KeyError or TypeError deep inside.

A field type is a Python type (``str``, ``int``, ``float``, ``bool``, ``dict``, ``list``), a tuple of
them, ``None`` in a tuple for nullable fields, or a :class:`ListOf` / :class:`MapOf` / :class:`Fields`.
``float`` accepts ints (JSON has one number type) and NaN/inf; ``int`` refuses floats and bools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sensq.errors import InputError


@dataclass(frozen=True)
class ListOf:
    item: Any


@dataclass(frozen=True)
class MapOf:
    """An object whose keys are free (strings) and whose values all have one type."""

    value: Any


@dataclass(frozen=True)
class Fields:
    """An object with named fields: ``required`` must be present, ``optional`` may be; others are refused
    unless ``extra`` (documents keep working when a later sensq adds a field at the top level)."""

    required: dict
    optional: dict | None = None
    extra: bool = False


_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false", dict: "an object",
          list: "a list", type(None): "null"}


def _describe(kind) -> str:
    if isinstance(kind, tuple):
        return " or ".join(_describe(k) for k in kind)
    if kind is None:
        return "null"
    if isinstance(kind, ListOf):
        return "a list"
    if isinstance(kind, (MapOf, Fields)):
        return "an object"
    return _NAMES.get(kind, kind.__name__)


def _matches(value, kind) -> bool:
    if kind is None:
        return value is None
    if isinstance(kind, tuple):
        return any(_matches(value, k) for k in kind)
    if isinstance(kind, ListOf):
        return isinstance(value, list)
    if isinstance(kind, (MapOf, Fields)):
        return isinstance(value, dict)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check(value, kind, where: str) -> None:
    """Check ``value`` against ``kind``.

    Raises:
        InputError: the first mismatch, naming its place (``where``), what was expected and what was found.
    """
    if not _matches(value, kind):
        raise InputError(f"{where} must be {_describe(kind)}, got {_show(value)}")
    alternatives = kind if isinstance(kind, tuple) else (kind,)
    for alternative in alternatives:
        if not _matches(value, alternative):
            continue
        if isinstance(alternative, ListOf):
            for i, item in enumerate(value):
                check(item, alternative.item, f"{where}[{i}]")
        elif isinstance(alternative, MapOf):
            for key, item in value.items():
                check(item, alternative.value, f"{where}.{key}")
        elif isinstance(alternative, Fields):
            for key, item_kind in alternative.required.items():
                if key not in value:
                    raise InputError(f"{where} lacks the field {key!r}")
                check(value[key], item_kind, f"{where}.{key}")
            optional = alternative.optional or {}
            for key, item_kind in optional.items():
                if key in value:
                    check(value[key], item_kind, f"{where}.{key}")
            if not alternative.extra:
                unknown = sorted(set(value) - set(alternative.required) - set(optional))
                if unknown:
                    raise InputError(f"{where} has an unknown field {unknown[0]!r}")
        return


def validate_document(data: dict, spec: Fields, path, kind: str) -> dict:
    """Check a whole document read from ``path``; the message starts with the file and its kind.

    Raises:
        InputError: ``"<path>: not a valid <kind>: <what>"``.
    """
    try:
        check(data, spec, "the document")
    except InputError as error:
        raise InputError(f"{str(path)!r} is not a valid {kind}: {error}") from None
    return data
