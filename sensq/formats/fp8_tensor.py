"""``fp8_e4m3_tensor``: FP8 E4M3 with one FP32 scale ``amax / 448`` for the whole tensor, registered as a sensq
format: ComfyUI's ``float8_e4m3fn`` layer (``weight`` E4M3 and a scalar ``weight_scale``), the most shared Wan2.2
format, holds it as it is.

Elements ``x / scale`` are clamped to +-448 and rounded to E4M3 (nearest, ties to even; ``-0`` keeps its sign);
an all-zero tensor takes scale 1; a NaN or Inf anywhere makes the scale NaN (every element decodes to NaN, as
``fp8_e4m3``'s blocks do). Decoding is ``E4M3(code) x scale`` in float32. Activations are scaled per tensor too
(dynamic, per call).
"""

from __future__ import annotations

import torch

from sensq.formats.reference import Encoded
from sensq.formats.spec import Codec, Family, FormatSpec, ScaleType, register_format

E4M3_MAX = 448.0


def encode(blocks: torch.Tensor, spec: FormatSpec) -> Encoded:
    amax = blocks.abs().amax() if blocks.numel() else torch.zeros((), device=blocks.device)
    scale = torch.where(amax == 0, 1.0, amax / E4M3_MAX)
    scale = torch.where(torch.isfinite(amax), scale, torch.nan).to(torch.float32)
    scaled = torch.clamp(blocks / scale, -E4M3_MAX, E4M3_MAX).nan_to_num(0)
    return Encoded(scaled.to(torch.float8_e4m3fn).view(torch.uint8), {"scale": scale})


def decode(encoded: Encoded, spec: FormatSpec) -> torch.Tensor:
    return encoded.codes.view(torch.float8_e4m3fn).to(torch.float32) * encoded.meta["scale"]


FP8_TENSOR = register_format(FormatSpec(
    name="fp8_e4m3_tensor", family=Family.FP8, element="E4M3", element_bits=8, block_size=None,
    scale=ScaleType.NONE, scale_bits=0, tensor_scale_bits=32, max_value=3.4028234663852886e38,
    min_nonzero=2.0**-149, n_values=253,
    summary="FP8 E4M3 (fn), one FP32 scale amax/448 per tensor (ComfyUI's float8_e4m3fn)"), Codec(encode, decode))
