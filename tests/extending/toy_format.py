"""A number format in one module: 3-bit signed integers (-3..3) with an FP32 absmax scale per 32 elements."""

import torch

from sensq.formats import Codec, Family, FormatSpec, ScaleType, register_format, unregister_format
from sensq.formats.reference import Encoded

INT3 = FormatSpec(name="toy_int3", family=Family.INT, element="INT3", element_bits=3, block_size=32,
                  scale=ScaleType.FP32, scale_bits=32, max_value=3.4028234663852886e38, min_nonzero=2.0**-149,
                  n_values=7, qmax=3, summary="toy: 3-bit integers, FP32 absmax scale per 32")


def encode(blocks: torch.Tensor, spec: FormatSpec) -> Encoded:
    scale = blocks.abs().amax(-1) / spec.qmax
    scale = torch.where(scale > 0, scale, 1.0)
    q = torch.clamp(torch.round(blocks / scale[..., None]), -spec.qmax, spec.qmax)
    return Encoded(q.to(torch.int8).view(torch.uint8), {"scale": scale})


def decode(encoded: Encoded, spec: FormatSpec) -> torch.Tensor:
    return encoded.codes.view(torch.int8).to(torch.float32) * encoded.meta["scale"][..., None]


def register() -> None:
    register_format(INT3, Codec(encode, decode))


def unregister() -> None:
    unregister_format(INT3.name)


register()
