"""The public entry points: quantize-dequantize along a dim with a chosen backend."""

from __future__ import annotations

import torch

from sensq.formats import reference
from sensq.formats.backend import Backend, kernel, resolve_backend
from sensq.formats.blocks import check_input, from_blocks, to_blocks
from sensq.formats.spec import FormatSpec, get_format


def quantize_dequantize(
    x: torch.Tensor,
    fmt: str | FormatSpec,
    dim: int = -1,
    *,
    backend: str | Backend = Backend.AUTO,
) -> torch.Tensor:
    """Round ``x`` to the format's values, block by block along ``dim``.

    The math is float32 whatever the input dtype (as the official HiF4 reference does); the
    result is cast back to ``x.dtype`` with round-to-nearest-even, which is exact for bfloat16
    and float32 outputs of the 4-bit formats. Non-contiguous inputs are read as they are; the
    result is always a new contiguous tensor. An empty tensor comes back as an empty copy.

    Args:
        x: a float32, bfloat16, float16 or float64 tensor.
        fmt: a format name (``sensq.formats.format_names()``) or ``FormatSpec``.
        dim: the dim blocks run along (``in_features`` for Linear weights and activations).
        backend: ``"auto"`` (default), ``"reference"``, ``"cpu"`` (numba: every format but bf16) or
            ``"triton"`` (HiF4, MXFP4, NVFP4).

    Returns:
        A tensor with ``x``'s shape, dtype and device.

    Raises:
        FormatError: unknown format.
        InputError: non-floating dtype, 0-d tensor, ``dim`` out of range.
        BackendUnavailableError: an explicitly named backend cannot run here.
    """
    spec = get_format(fmt)
    dim = check_input(x, dim)
    if x.numel() == 0:
        return x.clone()
    chosen = resolve_backend(backend, spec, x)
    if chosen is not Backend.REFERENCE:
        return kernel(chosen, spec.family, "quantize_dequantize")(x, spec, dim)
    blocks, layout = to_blocks(x, dim, spec.block_size)
    return from_blocks(reference.quantize_dequantize_blocks(blocks, spec), layout, x.dtype)
