"""``q4_k``: llama.cpp's Q4_K (GGUF), registered as a sensq format so that a plan can choose it, sensq measures
exactly it, and ``sensq export --to gguf`` writes its codes bit for bit.

A super-block of 256 elements is 8 sub-blocks of 32. Each sub-block has a 6-bit scale ``sc`` and a 6-bit min
``m``; the super-block an FP16 ``d`` and ``dmin``; an element is the 4-bit ``q`` in ``[0, 15]`` and decodes to
``(d sc) q - (dmin m)`` in float32, in that order (what gguf's own dequantizer computes: bit-identical).
4.5 bits per weight (144 bytes per 256).

Encoding is sensq's own rule (llama.cpp refines its scales by a search; any codes decode the same way): per
sub-block ``lo = min(x, 0)``, ``hi = max(x, 0)``, scale ``(hi - lo) / 15`` and min ``-lo``; ``d`` and ``dmin``
map the largest of them onto 63 (rounded to FP16), ``sc`` and ``m`` round to the nearest of 0..63, and ``q``
rounds ``(x + dmin m) / (d sc)`` to the nearest of 0..15 (half to even). A NaN anywhere in a super-block
decodes the whole super-block to NaN.
"""

from __future__ import annotations

import torch

from sensq.formats.reference import Encoded
from sensq.formats.spec import Codec, Family, FormatSpec, ScaleType, register_format

SUPER_BLOCK = 256
SUB_BLOCK = 32
SUBS = SUPER_BLOCK // SUB_BLOCK


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def encode(blocks: torch.Tensor, spec: FormatSpec) -> Encoded:
    rows, n_blocks, _ = blocks.shape
    sub = blocks.reshape(rows, n_blocks, SUBS, SUB_BLOCK)
    finite = torch.isfinite(sub).all(-1).all(-1)
    sub = torch.where(torch.isfinite(sub), sub, 0.0)
    lo = sub.amin(-1).clamp(max=0.0)
    hi = sub.amax(-1).clamp(min=0.0)
    scale, low = (hi - lo) / 15.0, -lo
    d = _fp16(scale.amax(-1) / 63.0)
    dmin = _fp16(low.amax(-1) / 63.0)
    safe_d = torch.where(d > 0, d, 1.0)
    safe_dmin = torch.where(dmin > 0, dmin, 1.0)
    sc = torch.clamp(torch.round(scale / safe_d[..., None]), 0, 63)
    m = torch.clamp(torch.round(low / safe_dmin[..., None]), 0, 63)
    step = d[..., None] * sc
    offset = dmin[..., None] * m
    q = torch.round((sub + offset[..., None]) / torch.where(step > 0, step, 1.0)[..., None])
    q = torch.where(step[..., None] > 0, torch.clamp(q, 0, 15), 0.0)
    d = torch.where(finite, d, torch.nan)
    return Encoded(q.reshape(rows, n_blocks, SUPER_BLOCK).to(torch.uint8),
                   {"d": d, "dmin": dmin, "sc": sc.to(torch.uint8), "m": m.to(torch.uint8)})


def decode(encoded: Encoded, spec: FormatSpec) -> torch.Tensor:
    meta = encoded.meta
    rows, n_blocks, _ = encoded.codes.shape
    step = meta["d"][..., None] * meta["sc"].to(torch.float32)
    offset = meta["dmin"][..., None] * meta["m"].to(torch.float32)
    q = encoded.codes.reshape(rows, n_blocks, SUBS, SUB_BLOCK).to(torch.float32)
    return (step[..., None] * q - offset[..., None]).reshape(rows, n_blocks, SUPER_BLOCK)


Q4_K = register_format(FormatSpec(
    name="q4_k", family=Family.KQUANT, element="UINT4", element_bits=4, block_size=SUPER_BLOCK,
    scale=ScaleType.KQUANT, scale_bits=2 * 16 + SUBS * 12, max_value=65504.0 * 63 * 15, min_nonzero=2.0**-24,
    n_values=16, summary="llama.cpp Q4_K (GGUF): 4-bit codes, 6-bit scale and min per 32, FP16 d and dmin per 256"),
    Codec(encode, decode))
