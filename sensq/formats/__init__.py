"""Number formats: HiF4, MXFP4, NVFP4, INT4/INT8, FP8 E4M3, BF16, MXFP8, and GGUF's Q4_K.

``get_format(name)`` returns a frozen :class:`FormatSpec`; ``quantize_dequantize(x, fmt, dim)``
rounds a tensor to the format; ``pack``/``unpack`` store it in its real bit layout.
"""

from sensq.formats import fp8_tensor, kquant, mxfp8  # noqa: F401 (register fp8_e4m3_tensor, q4_k, q6_k, mxfp8)
from sensq.formats.api import quantize_dequantize
from sensq.formats.backend import Backend, backend_names
from sensq.formats.packing import PackedTensor, pack, unpack
from sensq.formats.spec import (
    Codec,
    Family,
    FormatSpec,
    MXVariant,
    ScaleType,
    format_names,
    get_format,
    register_format,
    unregister_format,
)

__all__ = [
    "Backend",
    "Codec",
    "register_format",
    "unregister_format",
    "Family",
    "FormatSpec",
    "MXVariant",
    "PackedTensor",
    "ScaleType",
    "backend_names",
    "format_names",
    "get_format",
    "pack",
    "quantize_dequantize",
    "unpack",
]
