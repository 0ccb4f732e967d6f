"""``q4_k`` and ``q6_k``: llama.cpp's Q4_K and Q6_K (GGUF), registered as sensq formats so that a plan can choose
them, sensq measures exactly them, and ``sensq export --to gguf`` writes their codes bit for bit.

**Q4_K**.
A super-block of 256 elements is 8 sub-blocks of 32. Each sub-block has a 6-bit scale ``sc`` and a 6-bit min
``m``; the super-block an FP16 ``d`` and ``dmin``; an element is the 4-bit ``q`` in ``[0, 15]`` and decodes to
``(d sc) q - (dmin m)`` in float32, in that order (what gguf's own dequantizer computes: bit-identical).
4.5 bits per weight (144 bytes per 256).

Encoding is sensq's own rule (llama.cpp refines its scales by a search; any codes decode the same way): per
sub-block ``lo = min(x, 0)``, ``hi = max(x, 0)``, scale ``(hi - lo) / 15`` and min ``-lo``; ``d`` and ``dmin``
map the largest of them onto 63 (rounded to FP16), ``sc`` and ``m`` round to the nearest of 0..63, and ``q``
rounds ``(x + dmin m) / (d sc)`` to the nearest of 0..15 (half to even). A NaN anywhere in a super-block
decodes the whole super-block to NaN.

**Q6_K**. A super-block of 256 elements is 16 sub-blocks of 16, each with a signed 8-bit scale ``sc``, under one
FP16 ``d``; an element is the 6-bit ``q`` in ``[0, 63]`` and decodes to ``(d sc) (q - 32)`` in float32, in that
order (gguf's dequantizer: bit-identical). 6.5625 bits per weight in GGUF (210 bytes per 256); sensq's own
checkpoint stores the codes one per byte. Encoding, sensq's own rule (llama.cpp's first guess, without its
refinement search): per sub-block the largest magnitude ``a`` maps onto ``-32`` when it is a negative value
(scale ``a / 32``) and onto ``31`` otherwise (scale ``a / 31``), so scales are never negative and zero decodes
to +0; ``d`` maps the largest scale onto 127 (rounded to FP16), ``sc`` rounds to the nearest of 0..127 and
``q - 32`` rounds ``x / (d sc)`` to the nearest of -32..31 (half to even). A NaN or Inf anywhere in a
super-block decodes the whole super-block to NaN.
"""

from __future__ import annotations

import torch

from sensq.formats.reference import Encoded
from sensq.formats.spec import Codec, Family, FormatSpec, ScaleType, register_format

SUPER_BLOCK = 256
SUB_BLOCK = 32
SUBS = SUPER_BLOCK // SUB_BLOCK
Q6_SUB_BLOCK = 16
Q6_SUBS = SUPER_BLOCK // Q6_SUB_BLOCK


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


def encode_q6(blocks: torch.Tensor, spec: FormatSpec) -> Encoded:
    rows, n_blocks, _ = blocks.shape
    sub = blocks.reshape(rows, n_blocks, Q6_SUBS, Q6_SUB_BLOCK)
    finite = torch.isfinite(sub).all(-1).all(-1)
    sub = torch.where(torch.isfinite(sub), sub, 0.0)
    magnitude = sub.abs().amax(-1)
    negative_extreme = -sub.amin(-1) >= sub.amax(-1)
    scale = magnitude / torch.where(negative_extreme, 32.0, 31.0)
    d = _fp16(scale.amax(-1) / 127.0)
    sc = torch.clamp(torch.round(scale / torch.where(d > 0, d, 1.0)[..., None]), 0, 127)
    step = d[..., None] * sc
    q = torch.round(sub / torch.where(step > 0, step, 1.0)[..., None])
    q = torch.where(step[..., None] > 0, torch.clamp(q, -32, 31), 0.0) + 32
    d = torch.where(finite, d, torch.nan)
    return Encoded(q.reshape(rows, n_blocks, SUPER_BLOCK).to(torch.uint8), {"d": d, "sc": sc.to(torch.int8)})


def decode_q6(encoded: Encoded, spec: FormatSpec) -> torch.Tensor:
    rows, n_blocks, _ = encoded.codes.shape
    step = encoded.meta["d"][..., None] * encoded.meta["sc"].to(torch.float32)
    q = encoded.codes.reshape(rows, n_blocks, Q6_SUBS, Q6_SUB_BLOCK).to(torch.float32) - 32.0
    return (step[..., None] * q).reshape(rows, n_blocks, SUPER_BLOCK)


Q4_K = register_format(FormatSpec(
    name="q4_k", family=Family.KQUANT, element="UINT4", element_bits=4, block_size=SUPER_BLOCK,
    scale=ScaleType.KQUANT, scale_bits=2 * 16 + SUBS * 12, max_value=65504.0 * 63 * 15, min_nonzero=2.0**-24,
    n_values=16, summary="llama.cpp Q4_K (GGUF): 4-bit codes, 6-bit scale and min per 32, FP16 d and dmin per 256"),
    Codec(encode, decode))

Q6_K = register_format(FormatSpec(
    name="q6_k", family=Family.KQUANT, element="UINT6", element_bits=6, block_size=SUPER_BLOCK,
    scale=ScaleType.KQUANT_SIGNED, scale_bits=16 + Q6_SUBS * 8, max_value=65504.0 * 127 * 32, min_nonzero=2.0**-24,
    n_values=64, summary="llama.cpp Q6_K (GGUF): 6-bit codes, int8 scale per 16, FP16 d per 256"),
    Codec(encode_q6, decode_q6))
