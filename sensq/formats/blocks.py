"""Moving a tensor into blocks along one dim and back, and checking what callers pass in.

Blocks run contiguously along ``dim``; a tail shorter than a block is zero-padded and cropped
afterwards (HiF4 spec §2.2: padding zeros never raise a maximum, so a tail block quantizes like a
full block whose missing elements are 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sensq.errors import InputError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_input(x: torch.Tensor, dim: int) -> int:
    """Validate a tensor to quantize and return ``dim`` made non-negative.

    Raises:
        InputError: not a tensor, not a floating dtype, or ``dim`` out of range.
    """
    if not isinstance(x, torch.Tensor):
        raise InputError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise InputError(
            f"cannot quantize a {x.dtype} tensor; expected one of float32, bfloat16, float16, float64 "
            "(convert with x.float())"
        )
    if x.dim() == 0:
        raise InputError("cannot quantize a 0-d tensor along a dim; reshape it to 1-d first")
    if not -x.dim() <= dim < x.dim():
        raise InputError(f"dim={dim} is out of range for a {x.dim()}-d tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


@dataclass(frozen=True)
class BlockLayout:
    """How a tensor was reshaped into ``[rows, n_blocks, block]`` (see :func:`to_blocks`)."""

    shape: tuple[int, ...]
    dim: int
    length: int
    block: int

    @property
    def n_blocks(self) -> int:
        return -(-self.length // self.block)

    @property
    def rows(self) -> int:
        rows = 1
        for i, size in enumerate(self.shape):
            if i != self.dim:
                rows *= size
        return rows


def to_blocks(x: torch.Tensor, dim: int, block: int | None) -> tuple[torch.Tensor, BlockLayout]:
    """Return ``x`` as float32 ``[rows, n_blocks, block]`` with ``dim`` last and a zero-padded tail.

    ``block=None`` means one block spanning the whole dim. ``x`` must be non-empty.
    """
    length = x.shape[dim]
    block = length if block is None else block
    layout = BlockLayout(tuple(x.shape), dim, length, block)
    moved = x.movedim(dim, -1).to(torch.float32).reshape(-1, length)
    pad = (-length) % block
    if pad:
        moved = F.pad(moved, (0, pad))
    return moved.reshape(moved.shape[0], -1, block), layout


def from_blocks(blocks: torch.Tensor, layout: BlockLayout, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: crop the tail, restore the shape and cast to ``dtype`` (RNE)."""
    rows = blocks.reshape(blocks.shape[0], -1)[:, : layout.length]
    moved_shape = [s for i, s in enumerate(layout.shape) if i != layout.dim] + [layout.length]
    out = rows.reshape(moved_shape).movedim(-1, layout.dim)
    return out.to(dtype).contiguous()
