"""What a plan exporter is (:class:`Exporter`) and the registry ``sensq plan --export`` reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Exporter:
    """One library's form of a plan.

    Attributes:
        name: the ``--export`` choice (``torchao``).
        extension: of each expert module's file (``json``).
        translate: ``(weight format, activation format or None) -> the library's config for one layer``, or
            None where the library has no equivalent (the layer then stays in high precision there).
        document: ``(layers [(name, config)], plan, attr) -> the file's content`` for ``pipe.<attr>``.
        serialize: ``(document, attr) -> bytes``.
        recognise: ``(first 4 kB of an existing file) -> whether sensq wrote it`` (else it is never replaced).
    """

    name: str
    extension: str
    translate: Callable
    document: Callable
    serialize: Callable
    recognise: Callable[[str], bool]


EXPORTERS: dict[str, Exporter] = {}


def register_exporter(exporter: Exporter) -> Exporter:
    EXPORTERS[exporter.name] = exporter
    return exporter


def provenance(plan, attr: str) -> dict:
    """What an exported file records of the plan it came from."""
    return {"module": f"pipe.{attr}", "model": plan.model.get("id"),
            "plan_source": {k: plan.source.get(k) for k in ("ranking_file", "budget", "top_k", "ranking_metric")}}
