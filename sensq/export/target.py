"""What an export target is (:class:`Target`), the registry (:data:`TARGETS`) and what targets share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sensq.errors import InputError
from sensq.formats import FormatSpec
from sensq.formats.packing import PackedTensor


@dataclass
class Layer:
    """One layer of an expert as sensq deployed it: its packed weight (None: kept in high precision) and the
    weight the deployed layer computes with (``[out, in]``; the patch embedding's conv shape flattened)."""

    name: str
    wan: str
    packed: PackedTensor | None
    weight: torch.Tensor
    bias: torch.Tensor | None
    shape: tuple[int, ...] = ()
    """The layer's own weight shape (a Conv3d's five dims; the packed weight is two)."""


@dataclass
class Written:
    """What a target made of one layer: its tensors by Wan key, the target's type name, and whether sensq's
    codes are kept (then ``nmse`` is 0 by construction unless the target re-rounds a scale)."""

    tensors: dict
    kind: str
    codes_kept: bool
    nmse: float | None = None
    note: str = ""


@dataclass
class Target:
    """An export target: how one quantized layer is laid out (:attr:`layer`, raising InputError for a format
    it has no layout for), and how one expert's tensors are written (:attr:`write`)."""

    name: str
    suffix: str
    help: str
    layer: Callable[[Layer], Written]
    write: Callable[[Path, dict, str], None]
    """(path, {wan key: tensor or Written}, family name) -> writes the file atomically."""


TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Add an export target: ``sensq export --to`` and :func:`sensq.export.export_checkpoint` take it by name."""
    TARGETS[target.name] = target
    return target


def unregister_target(name: str) -> None:
    """Remove a target added by :func:`register_target` (tests)."""
    TARGETS.pop(name, None)


def nearest_format(fmt: FormatSpec, four_bit: str, eight_bit: str, target: str) -> InputError:
    """The one-line refusal of a format ``target`` has no layout for, naming the nearest one it has."""
    nearest = four_bit if fmt.element_bits <= 4 else eight_bit
    return InputError(f"{target} has no layout for sensq's {fmt.identity}: plan the quantized layers in {nearest} "
                      f"(sensq plan ... --format {nearest}, then apply-plan) to export them")


def nmse(approx: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.double()
    power = float((reference * reference).sum())
    return float(((approx.double() - reference) ** 2).sum()) / (power or 1.0)
