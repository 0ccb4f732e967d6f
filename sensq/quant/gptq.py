"""GPTQ: error-compensating weight rounding onto a block format's own grid (Frantar et al., 2023).

For a GEMM weight ``W [out, in]`` with calibration inputs ``X [n, in]``, GPTQ rounds ``W`` one input
column at a time and, after each column, moves that column's rounding error onto the columns not yet
rounded, along the inverse Hessian of the layer's output error ``||X W^T - X Q^T||^2``
(``H = X^T X / n``, plus a damping of 1% of its mean diagonal). Lazy batches of 128 columns, as in the
paper; no activation reordering.

Block formats are rounded within their own scales, as each format defines them. At the first column of
every format block (64 columns for HiF4, 32 for MXFP4, 16 for NVFP4, the group for INT4) the block's
metadata is chosen by the format's encoder (:mod:`sensq.formats.reference`) from the block's *current*
values, the rounding error of the columns before it included: HiF4's E6M2 scale and its lv2/lv3 bits,
MXFP4's E8M0, NVFP4's E4M3, INT4's FP32 scale, Q4_K's and Q6_K's two levels of scales (at the first column
of each 256-wide super-block). Each column of the block is then rounded to the nearest
of the values that this metadata can decode (one per code). The result is codes plus metadata,
stored as they are (:func:`sensq.formats.packing.pack_encoded`), so the deployed weight is exactly
the weight GPTQ chose: nothing re-encodes it (HiF4 is not idempotent).

Only 4-bit element formats with block metadata and the K-quants are supported; NVFP4 with a per-tensor scale
(``nvfp4_ts``) is not (its tensor scale would change with every block's update).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sensq.errors import InputError
from sensq.formats import FormatSpec, PackedTensor, reference
from sensq.formats.packing import pack_encoded
from sensq.formats.spec import Family

DAMPING = 0.01
LAZY_BATCH = 128


def gptq_refusal(spec: FormatSpec) -> str | None:
    """Why GPTQ cannot round weights to ``spec`` (not 4-bit elements, or a per-tensor scale); None when it can."""
    if (spec.element_bits != 4 and spec.family is not Family.KQUANT) or spec.family is Family.BF16:
        return (f"--calibrate gptq rounds 4-bit weights (hif4, mxfp4, nvfp4, int4) and GGUF's K-quants (q4_k, "
                f"q6_k); {spec.identity} weights use --calibrate mse or none")
    if spec.tensor_scale_bits:
        return (f"--calibrate gptq does not support {spec.identity} (its per-tensor scale changes as blocks are "
                "updated); use nvfp4 or --calibrate mse")
    return None


def check_gptq_format(spec: FormatSpec) -> None:
    """Raises InputError with :func:`gptq_refusal`'s reason."""
    reason = gptq_refusal(spec)
    if reason is not None:
        raise InputError(reason)


def _alphabet(spec: FormatSpec) -> torch.Tensor:
    """Every valid element code, as :mod:`reference` stores codes (INT: int8 viewed as uint8)."""
    if spec.family is Family.INT:
        return torch.arange(-spec.qmax, spec.qmax + 1, dtype=torch.int8).view(torch.uint8)
    return torch.arange(2**spec.element_bits, dtype=torch.uint8)  # 4-bit float codes; K-quants' unsigned ones


def _candidates(meta: dict[str, torch.Tensor], spec: FormatSpec, alphabet: torch.Tensor, rows: int,
                block: int) -> torch.Tensor:
    """``[rows, block, codes]``: the value each code decodes to at each position, under ``meta``."""
    values = []
    for code in alphabet.tolist():
        codes = torch.full((rows, 1, block), code, dtype=torch.uint8, device=alphabet.device)
        values.append(reference.decode(reference.Encoded(codes, meta), spec)[:, 0, :])
    return torch.stack(values, dim=-1)


def _inverse_hessian_factor(rows: torch.Tensor, length: int) -> torch.Tensor:
    """The upper Cholesky factor of ``H^-1`` (padded to ``length`` columns), damped until it factors: float64 on
    the CPU, float32 on a GPU (as GPTQ's own code)."""
    precision = torch.float64 if rows.device.type == "cpu" else torch.float32
    x = rows.to(precision)
    hessian = torch.zeros(length, length, dtype=precision, device=rows.device)
    hessian[: x.shape[1], : x.shape[1]] = x.T @ x / max(x.shape[0], 1)
    dead = torch.diagonal(hessian) == 0  # channels that never see input (and padding): decoupled
    hessian[dead, dead] = 1.0
    mean_diagonal = float(torch.diagonal(hessian).mean())
    identity = torch.eye(length, dtype=precision, device=rows.device)
    for attempt in range(6):
        damped = hessian + identity * DAMPING * 10**attempt * mean_diagonal
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            return torch.linalg.cholesky(inverse, upper=True).float()
    raise InputError("GPTQ: the calibration inputs' Hessian is not positive definite even with 10^5 x damping; "
                     "probe more prompts or tokens")


def gptq_pack(weight: torch.Tensor, rows: torch.Tensor, spec: FormatSpec, *,
              dtype: torch.dtype | None = None) -> PackedTensor:
    """GPTQ-round ``weight`` ``[out, in]`` to ``spec`` on calibration inputs ``rows`` ``[n, in]``, on the weight's
    device.

    Returns:
        The packed weight (``[out, in]`` along dim 1, unpacking to ``dtype``, default the weight's).

    Raises:
        InputError: an unsupported format, a non-finite weight or input, mismatched widths.
    """
    check_gptq_format(spec)
    if weight.dim() != 2 or rows.dim() != 2 or rows.shape[1] != weight.shape[1]:
        raise InputError(f"GPTQ needs a weight [out, in] and inputs [n, in]; got {list(weight.shape)} and "
                         f"{list(rows.shape)}")
    if not torch.isfinite(weight).all() or not torch.isfinite(rows).all():
        raise InputError("GPTQ: the weight or its calibration inputs hold NaN or Inf")
    out_features, length = weight.shape
    block = spec.block_size or length
    n_blocks = -(-length // block)
    padded = n_blocks * block
    device = weight.device  # on the weight's device: a GPU when the model is on one
    w = F.pad(weight.detach().float(), (0, padded - length))
    factor = _inverse_hessian_factor(rows.detach().float().to(device), padded)
    alphabet = _alphabet(spec).to(device)
    codes = torch.zeros(out_features, n_blocks, block, dtype=torch.uint8, device=device)
    metas: list[dict[str, torch.Tensor]] = []
    batch = block * math.ceil(LAZY_BATCH / block)
    table = torch.empty(0)
    for start in range(0, padded, batch):
        stop = min(start + batch, padded)
        w1 = w[:, start:stop].clone()
        errors = torch.zeros_like(w1)
        h1 = factor[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            index, position = divmod(column, block)
            if position == 0:  # the block's metadata, from its current values (format's own encoder)
                meta = reference.encode(w1[:, i:i + block].unsqueeze(1), spec).meta
                metas.append(meta)
                table = _candidates(meta, spec, alphabet, out_features, block)
            values = w1[:, i]
            candidates = table[:, position, :]
            choice = (values[:, None] - candidates).abs().argmin(dim=1)
            codes[:, index, position] = alphabet[choice]
            rounded = candidates.gather(1, choice[:, None])[:, 0]
            error = (values - rounded) / h1[i, i]
            w1[:, i:] -= error[:, None] * h1[i, i:][None, :]
            errors[:, i] = error
        w[:, stop:] -= errors @ factor[start:stop, stop:]
    meta = {key: torch.cat([m[key] for m in metas], dim=1) for key in metas[0]}
    encoded = reference.Encoded(codes, meta)
    return pack_encoded(encoded, spec, (out_features, length), 1, dtype or weight.dtype)
