"""``mxfp8``: OCP MX v1.0 MXFP8 (E4M3 elements, an E8M0 power-of-two scale per 32), registered as a sensq format.

Per the spec: the block's scale is ``X = 2^(floor(log2 amax) - 8)`` (8 = E4M3's largest exponent), clamped to
E8M0's ``2^-127 .. 2^127``; each element is ``x / X`` rounded to E4M3 (nearest, ties to even) and saturated
at 448; an all-zero block takes the smallest scale; a block holding NaN or Inf decodes to NaN (scale code
0xFF). Decoding is ``E4M3(code) x X`` in float32. ComfyUI's own quantizer picks ``ceil(log2(amax / 448))``
instead (the smallest scale that fits, never saturating); both decode the same way, so ``sensq export``
keeps sensq's codes and comfy-kitchen's dequantizer reads them bit for bit (except a block whose scale is
2^-127, which its bit-cast of E8M0 reads as 0: only blocks below 2^-119 in magnitude).
"""

from __future__ import annotations

import torch

from sensq.formats.reference import Encoded
from sensq.formats.spec import Codec, Family, FormatSpec, ScaleType, register_format

BLOCK = 32
E4M3_MAX = 448.0
E4M3_EMAX = 8
NAN_CODE = 0xFF


def encode(blocks: torch.Tensor, spec: FormatSpec) -> Encoded:
    amax = blocks.abs().amax(-1)
    finite = torch.isfinite(amax)
    safe = torch.where(finite & (amax > 0), amax, 1.0)
    exponent = torch.clamp(torch.floor(torch.log2(safe)) - E4M3_EMAX, -127, 127)
    exponent = torch.where(finite & (amax > 0), exponent, -127.0)
    scale = torch.ldexp(torch.ones_like(exponent), exponent.to(torch.int32))
    scaled = torch.clamp(blocks / scale[..., None], -E4M3_MAX, E4M3_MAX)
    scaled = torch.where(finite[..., None], scaled, 0.0)
    codes = scaled.to(torch.float8_e4m3fn).view(torch.uint8)
    scale_code = torch.where(finite, (exponent + 127).to(torch.uint8), NAN_CODE)
    return Encoded(codes, {"scale": scale_code.to(torch.uint8)})


def decode(encoded: Encoded, spec: FormatSpec) -> torch.Tensor:
    code = encoded.meta["scale"]
    scale = torch.ldexp(torch.ones(code.shape, dtype=torch.float32, device=code.device), code.to(torch.int32) - 127)
    scale = torch.where(code == NAN_CODE, torch.nan, scale)
    return encoded.codes.view(torch.float8_e4m3fn).to(torch.float32) * scale[..., None]


MXFP8 = register_format(FormatSpec(
    name="mxfp8", family=Family.MXFP8, element="E4M3", element_bits=8, block_size=BLOCK, scale=ScaleType.E8M0,
    scale_bits=8, max_value=E4M3_MAX * 2.0**119, min_nonzero=2.0**-9 * 2.0**-127, n_values=253,  # float32 inputs
    summary="MXFP8 per OCP MX v1.0: E4M3 elements, E8M0 scale 2^(floor(log2 amax)-8) per 32"), Codec(encode, decode))
