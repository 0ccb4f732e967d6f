"""Reference codecs: every format, step by step in plain torch (float32 math, CPU or GPU).

Each family has ``encode(blocks, spec) -> Encoded`` (codes and per-block metadata, exactly the
fields the packed layout stores) and ``decode(encoded, spec) -> blocks``; quantize-dequantize is
``decode(encode(x))``. Fast backends (``sensq.kernels``) are tested bit-exact against this file.

``blocks`` is float32 ``[rows, n_blocks, block]`` (see ``sensq.formats.blocks``). Every
intermediate below is an IEEE float32 torch op unless a comment says otherwise: the golden data
was produced by float32 torch, and float64 shortcuts differ on ties (HiF4 spec §5B).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sensq.formats.spec import (
    E2M1_MAX,
    E2M1_VALUES,
    E4M3_MAX,
    HIF4_SCALE_MAX,
    HIF4_SCALE_MIN,
    Codec,
    Family,
    FormatSpec,
    MXVariant,
    codec_of,
    format_names,
    get_format,
    register_format,
)

NAN_SCALE_CODE = 0xFF
"""Scale byte of a block poisoned by NaN (HiF4 spec §6; also E8M0's NaN)."""
E4M3_NAN_CODE = 0x7F


@dataclass
class Encoded:
    """Codes and metadata of a blocked tensor.

    Attributes:
        codes: uint8 ``[rows, n_blocks, block]``, one code per element (a 4-bit nibble for the
            4-bit formats, a byte for INT8/FP8, unused for BF16 which keeps ``values``).
        meta: per-block tensors ``[rows, n_blocks]`` (and 0-d per-tensor ones), by name.
    """

    codes: torch.Tensor
    meta: dict[str, torch.Tensor] = field(default_factory=dict)


def _sign_bit(blocks: torch.Tensor) -> torch.Tensor:
    """1 where x < 0 (so -0.0 and NaN give 0: x = ±0 -> +0.0, spec §3 step 10)."""
    return (blocks < 0).to(torch.uint8)


def _apply_sign(magnitude: torch.Tensor, codes: torch.Tensor, sign_mask: int) -> torch.Tensor:
    # -magnitude of a +0 is -0.0: a negative x that rounds to zero stays -0.0 (spec §3 step 10).
    return torch.where((codes & sign_mask) != 0, -magnitude, magnitude)


# --------------------------------------------------------------------------------------------
# HiF4 (spec §3; field layout §6)
# --------------------------------------------------------------------------------------------

HIF4_INV7 = 0.142578125  # bf16_RNE(1/7), spec §3 step 2
_E6M2_REC_MANTISSA = (1.0, 0.80078125, 0.66796875, 0.5703125)  # bf16_RNE(1/(1+m/4)), spec §3 step 6


def _bf16_rne(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


def _hif4_encode(blocks: torch.Tensor) -> Encoded:
    rows, n_blocks, _ = blocks.shape
    magnitude = blocks.abs()
    # step 1: maxima per 4, per 8 and per 64 (amax propagates NaN, as torch.max does in GT)
    max4 = magnitude.reshape(rows, n_blocks, 16, 4).amax(-1)
    max8 = max4.reshape(rows, n_blocks, 8, 2).amax(-1)
    max64 = max8.amax(-1)
    # steps 2-3: s = bf16(fp32(M * INV7)), clipped to [2^-48, 49152]
    s = _bf16_rne(max64 * HIF4_INV7).clip(HIF4_SCALE_MIN, HIF4_SCALE_MAX)
    # step 5: E6M2 scale, round-half-even to 2 mantissa bits (torch.round is half-even)
    mantissa, exponent = torch.frexp(s)  # s = mantissa * 2^exponent, mantissa in [0.5, 1)
    exponent = exponent - 1  # e = floor(log2 s)
    quarters = torch.round(mantissa * 8)  # s * 2^(2-e) in [4, 8] after rounding
    carry = quarters == 8
    exponent = torch.where(carry, exponent + 1, exponent)
    scale_mantissa = torch.where(carry, 0, quarters.to(torch.int32) - 4)  # m in 0..3
    is_nan = torch.isnan(max64)
    scale_code = ((exponent + 48) * 4 + scale_mantissa).to(torch.uint8)
    scale_code = torch.where(is_nan, NAN_SCALE_CODE, scale_code)
    sf = _e6m2_value(scale_code)
    # step 6: rec = bf16(fp32(1 / sf))
    rec = _bf16_rne(1.0 / sf)
    # step 7: lv2 per 8-block; step 8: lv3 per 4-block, the product rounded before the exact /L2
    lv2 = torch.where(max8 * rec[..., None] >= 4, 2.0, 1.0)
    lv2_per4 = lv2.repeat_interleave(2, dim=-1)
    lv3 = torch.where((max4 * rec[..., None]) / lv2_per4 >= 2, 2.0, 1.0)
    # step 9: mantissa with half-up rounding, +0.5 in fp32, saturating at 1.75
    lv2_each = lv2.repeat_interleave(8, dim=-1)
    lv3_each = lv3.repeat_interleave(4, dim=-1)
    t = magnitude / lv2_each / lv3_each * rec[..., None]
    q4 = torch.floor(t * 4 + 0.5)
    q4 = torch.where(q4 >= 8, 7.0, q4)  # also maps +inf to 7; NaN groups are decoded from the scale
    q4 = torch.nan_to_num(q4, nan=0.0)
    codes = (_sign_bit(blocks) << 3) | q4.to(torch.uint8)
    lv2_bits = ((lv2 == 2).to(torch.int32) << torch.arange(8, device=blocks.device)).sum(-1)
    lv3_bits = ((lv3 == 2).to(torch.int32) << torch.arange(16, device=blocks.device)).sum(-1)
    lv2_bits = torch.where(is_nan, 0, lv2_bits)
    lv3_bits = torch.where(is_nan, 0, lv3_bits)
    codes = torch.where(is_nan[..., None], 0, codes)
    return Encoded(codes, {"scale": scale_code, "lv2": lv2_bits, "lv3": lv3_bits})


def _e6m2_value(scale_code: torch.Tensor) -> torch.Tensor:
    """E6M2 byte -> float32: ``(1 + m/4) * 2^(E)`` with ``E = (code >> 2) - 48``; 0xFF is NaN."""
    code = scale_code.to(torch.int32)
    value = (1.0 + (code & 3).to(torch.float32) / 4) * torch.exp2(((code >> 2) - 48).to(torch.float32))
    return torch.where(code == NAN_SCALE_CODE, torch.nan, value)


def _hif4_decode(encoded: Encoded) -> torch.Tensor:
    codes = encoded.codes
    sf = _e6m2_value(encoded.meta["scale"])
    bit8 = torch.arange(8, device=codes.device)
    bit16 = torch.arange(16, device=codes.device)
    lv2 = 1 + ((encoded.meta["lv2"][..., None] >> bit8) & 1)  # [rows, n_blocks, 8]
    lv3 = 1 + ((encoded.meta["lv3"][..., None] >> bit16) & 1)  # [rows, n_blocks, 16]
    shift = (lv2.repeat_interleave(8, dim=-1) * lv3.repeat_interleave(4, dim=-1)).to(torch.float32)
    magnitude = (codes & 7).to(torch.float32) / 4 * shift * sf[..., None]
    return _apply_sign(magnitude, codes, 8)


# --------------------------------------------------------------------------------------------
# E2M1 elements (MXFP4, NVFP4)
# --------------------------------------------------------------------------------------------

def _e2m1_code(value: torch.Tensor) -> torch.Tensor:
    """Magnitude already on the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} -> 3-bit code."""
    return torch.where(value < 2, value * 2, torch.where(value < 4, value + 2, value / 2 + 4)).to(torch.uint8)


def _e2m1_value(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return table[(codes & 7).long()]


def _e2m1_rne(scaled: torch.Tensor) -> torch.Tensor:
    """Round magnitudes to E2M1 with ties to even, saturating at 6 (OCP MX / NVFP4 elements)."""
    scaled = scaled.clamp(max=E2M1_MAX)  # saturate first (also maps +inf to 6)
    exponent = torch.floor(torch.log2(scaled)).clamp(min=0)  # log2(0) = -inf -> 0
    step = torch.exp2(exponent - 1)
    return torch.clamp(torch.round(scaled / step) * step, max=E2M1_MAX)


def _mxfp4_encode(blocks: torch.Tensor, variant: MXVariant) -> Encoded:
    magnitude = blocks.abs()
    amax = magnitude.amax(-1)
    if variant is MXVariant.HIFLOAT4_REPO:
        # spec §7: se = floor(log2(max + 9.6e-7)) - 2 in [-129, 125]; pe = clip(floor(log2(xb + 9.6e-7)), 0, 2);
        # m = floor(xb / 2^pe * 2 + 0.5) / 2 (half-up), v = min(m * 2^pe, 6)
        shared_exp = (torch.floor(torch.log2(amax + 9.6e-7)) - 2).clamp(-129, 125)
        scaled = magnitude / torch.exp2(shared_exp)[..., None]
        elem_exp = torch.floor(torch.log2(scaled + 9.6e-7)).clamp(0, 2)
        elem_scale = torch.exp2(elem_exp)
        value = torch.clamp(torch.floor(scaled / elem_scale * 2 + 0.5) / 2 * elem_scale, max=E2M1_MAX)
        # se < -127 zeroes the block (cannot happen with the bias: se >= -22; kept for the E8M0 range)
        value = torch.where((shared_exp < -127)[..., None], 0.0, value)
        shared_exp = shared_exp.clamp(min=-127)
    else:
        # OCP MX v1.0 §6.3: X = 2^(floor(log2 amax) - emax_elem), emax_elem = 2; all-zero -> 2^-127.
        # floor(log2 amax) is the exact exponent of amax (frexp), not floor(torch.log2(amax)): torch's
        # float32 log2 is correctly rounded and reaches the next integer just below most powers of two
        # (log2(8 - ulp) == 3.0), which would pick an exponent one too high there.
        exact = (torch.frexp(amax).exponent - 1).to(torch.float32)
        shared_exp = torch.where(torch.isinf(amax), 127.0, exact - 2).clamp(-127, 127)
        shared_exp = torch.where(amax == 0, -127.0, shared_exp)
        scaled = magnitude / torch.exp2(shared_exp)[..., None]
        value = _e2m1_rne(scaled)
    is_nan = torch.isnan(amax)
    value = torch.nan_to_num(value, nan=0.0)
    codes = (_sign_bit(blocks) << 3) | _e2m1_code(value)
    scale_code = torch.where(is_nan, NAN_SCALE_CODE, (shared_exp.nan_to_num(0) + 127).to(torch.uint8))
    codes = torch.where(is_nan[..., None], 0, codes)
    return Encoded(codes, {"scale": scale_code})


def _mxfp4_decode(encoded: Encoded) -> torch.Tensor:
    code = encoded.meta["scale"].to(torch.int32)
    scale = torch.where(code == NAN_SCALE_CODE, torch.nan, torch.exp2((code - 127).to(torch.float32)))
    magnitude = _e2m1_value(encoded.codes) * scale[..., None]
    return _apply_sign(magnitude, encoded.codes, 8)


def _nvfp4_encode(blocks: torch.Tensor, tensor_scale: bool) -> Encoded:
    magnitude = blocks.abs()
    amax = magnitude.amax(-1)
    meta: dict[str, torch.Tensor] = {}
    if not tensor_scale:
        # spec §7: sf = clip(max/6, 0, 448); e = max(floor(log2(sf + 2^-45)), -6);
        # S = round(sf * 2^(3-e)) * 2^(e-3) (RNE: E4M3 incl. subnormals, may be 0)
        sf = torch.clip(amax / 6, 0, E4M3_MAX)
        exponent = torch.clamp(torch.floor(torch.log2(sf + 2.0**-45)), min=-6)
        block_scale = torch.round(sf * torch.exp2(3 - exponent)) * torch.exp2(exponent - 3)
        # igv = |x| / S, non-finite -> 6; E2 = max(floor(log2(igv + 2^-45)), 0); M1 = round(igv * 2^(1-E2)) / 2
        igv = magnitude / block_scale[..., None]
        igv = torch.where(torch.isfinite(igv), igv, E2M1_MAX)
        elem_exp = torch.clamp(torch.floor(torch.log2(igv + 2.0**-45)), min=0)
        value = torch.clamp(torch.round(igv * torch.exp2(1 - elem_exp)) / 2 * torch.exp2(elem_exp), 0, E2M1_MAX)
        effective = block_scale
    else:
        # The two-level NVFP4 recipe: a per-tensor FP32 scale amax/(448*6) maps the largest block
        # scale to E4M3's maximum; block scales are E4M3 (RNE, saturating), elements E2M1 (RNE).
        finite = torch.where(torch.isfinite(amax), amax, 0.0)
        tensor_amax = finite.amax() if finite.numel() else torch.zeros((), device=blocks.device)
        global_scale = torch.where(tensor_amax > 0, tensor_amax / (E4M3_MAX * E2M1_MAX), 1.0)
        block_scale = (amax / E2M1_MAX / global_scale).clamp(max=E4M3_MAX)
        block_scale = block_scale.to(torch.float8_e4m3fn).to(torch.float32)
        effective = block_scale * global_scale
        scaled = magnitude / effective[..., None]
        value = _e2m1_rne(torch.where(torch.isfinite(scaled), scaled, E2M1_MAX))
        meta["tensor_scale"] = global_scale.to(torch.float32)
    is_nan = torch.isnan(amax)
    value = torch.where(effective[..., None] == 0, 0.0, torch.nan_to_num(value, nan=0.0))
    codes = (_sign_bit(blocks) << 3) | _e2m1_code(value)
    scale_code = block_scale.nan_to_num(0).to(torch.float8_e4m3fn).view(torch.uint8)
    meta["scale"] = torch.where(is_nan, E4M3_NAN_CODE, scale_code)
    codes = torch.where(is_nan[..., None], 0, codes)
    return Encoded(codes, meta)


def _nvfp4_decode(encoded: Encoded) -> torch.Tensor:
    scale = encoded.meta["scale"].view(torch.float8_e4m3fn).to(torch.float32)
    if "tensor_scale" in encoded.meta:
        scale = scale * encoded.meta["tensor_scale"]
    magnitude = _e2m1_value(encoded.codes) * scale[..., None]
    return _apply_sign(magnitude, encoded.codes, 8)


# --------------------------------------------------------------------------------------------
# Scaled INT and FP8 (per group, per channel or per token)
# --------------------------------------------------------------------------------------------

def _absmax_scale(blocks: torch.Tensor, qmax: float) -> torch.Tensor:
    """FP32 scale absmax/qmax per block; 1.0 for all-zero blocks; NaN when the block is not finite.

    A non-finite block (NaN or ±Inf anywhere) has no meaningful scale: it decodes to all NaN.
    """
    amax = blocks.abs().amax(-1)
    scale = torch.where(amax == 0, 1.0, amax / qmax)
    return torch.where(torch.isfinite(amax), scale, torch.nan)


def _int_encode(blocks: torch.Tensor, qmax: int) -> Encoded:
    scale = _absmax_scale(blocks, qmax)
    q = torch.clamp(torch.round(blocks / scale[..., None]), -qmax, qmax).nan_to_num(0)
    return Encoded(q.to(torch.int8).view(torch.uint8), {"scale": scale})


def _int_decode(encoded: Encoded) -> torch.Tensor:
    # q * scale with an integer q: zero codes give +0.0 (two's complement has no -0)
    return encoded.codes.view(torch.int8).to(torch.float32) * encoded.meta["scale"][..., None]


def _fp8_encode(blocks: torch.Tensor) -> Encoded:
    scale = _absmax_scale(blocks, E4M3_MAX)
    # clamp before the cast: torch's out-of-range float8 conversion is not the same on every device
    scaled = torch.clamp(blocks / scale[..., None], -E4M3_MAX, E4M3_MAX).nan_to_num(0)
    return Encoded(scaled.to(torch.float8_e4m3fn).view(torch.uint8), {"scale": scale})


def _fp8_decode(encoded: Encoded) -> torch.Tensor:
    return encoded.codes.view(torch.float8_e4m3fn).to(torch.float32) * encoded.meta["scale"][..., None]


def _bf16_encode(blocks: torch.Tensor) -> Encoded:
    return Encoded(blocks.to(torch.bfloat16).contiguous().view(torch.uint8))


def _bf16_decode(encoded: Encoded) -> torch.Tensor:
    shape = encoded.codes.shape
    return encoded.codes.reshape(*shape[:-1], -1, 2).view(torch.bfloat16).reshape(*shape[:-1], -1).float()


_BUILT_IN = {  # by family: the codecs of the built-in formats, which the kernels match bit for bit (tested)
    Family.HIF4: Codec(lambda blocks, spec: _hif4_encode(blocks), lambda encoded, spec: _hif4_decode(encoded),
                       kernels=True),
    Family.MXFP4: Codec(lambda blocks, spec: _mxfp4_encode(blocks, spec.mx_variant),
                        lambda encoded, spec: _mxfp4_decode(encoded), kernels=True),
    Family.NVFP4: Codec(lambda blocks, spec: _nvfp4_encode(blocks, tensor_scale=spec.tensor_scale_bits > 0),
                        lambda encoded, spec: _nvfp4_decode(encoded), kernels=True),
    Family.INT: Codec(lambda blocks, spec: _int_encode(blocks, spec.qmax), lambda encoded, spec: _int_decode(encoded),
                      kernels=True),
    Family.FP8: Codec(lambda blocks, spec: _fp8_encode(blocks), lambda encoded, spec: _fp8_decode(encoded),
                      kernels=True),
    Family.BF16: Codec(lambda blocks, spec: _bf16_encode(blocks), lambda encoded, spec: _bf16_decode(encoded),
                       kernels=True),
}
for _name in format_names():
    _spec = get_format(_name)
    register_format(_spec, _BUILT_IN[_spec.family])


def encode(blocks: torch.Tensor, spec: FormatSpec) -> Encoded:
    """Codes and metadata of float32 ``blocks`` ``[rows, n_blocks, block]`` in ``spec`` (its registered codec)."""
    return codec_of(spec).encode(blocks, spec)


def decode(encoded: Encoded, spec: FormatSpec) -> torch.Tensor:
    """float32 values of ``encoded`` (the inverse layout of :func:`encode`)."""
    return codec_of(spec).decode(encoded, spec)


def quantize_dequantize_blocks(blocks: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """Reference quantize-dequantize of float32 blocks: ``decode(encode(blocks))``."""
    return decode(encode(blocks, spec), spec)
