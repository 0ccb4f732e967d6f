"""HiF4 beyond the golden pairs: every encodable value, and algebraic properties (spec §3, §4)."""

import itertools

import pytest
import torch

from sensq.formats import get_format, quantize_dequantize
from sensq.formats.reference import NAN_SCALE_CODE, Encoded, _e6m2_value, decode, encode
from sensq.testing import assert_bitexact, bitwise_mismatches

HIF4 = get_format("hif4")
MAGNITUDES = (0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7)  # spec §4, x sf


def _all_scales() -> list[float]:
    """The 255 E6M2 scales of spec §3 step 5: (1 + m/4) 2^E in [2^-48, 49152]."""
    scales = [(1 + m / 4) * 2.0**e for e in range(-48, 16) for m in range(4)]
    return [s for s in scales if s <= 49152]


def test_every_field_combination_decodes_to_the_spec_value_set():
    scales = _all_scales()
    assert len(scales) == 255
    codes = torch.arange(16, dtype=torch.uint8)
    for lv2_bit, lv3_bit in itertools.product((0, 1), (0, 1)):
        block_codes = torch.zeros(255, 1, 64, dtype=torch.uint8)
        block_codes[:, 0, :16] = codes  # 4-block 0..3 (8-blocks 0, 1)
        encoded = Encoded(block_codes, {
            "scale": torch.arange(255, dtype=torch.uint8).reshape(255, 1),
            "lv2": torch.full((255, 1), 0b11 * lv2_bit, dtype=torch.int32),
            "lv3": torch.full((255, 1), 0b1111 * lv3_bit, dtype=torch.int32),
        })
        values = decode(encoded, HIF4)[:, 0, :16]
        for row, sf in enumerate(scales):
            shift = 2 ** (lv2_bit + lv3_bit)
            expected = [m / 4 * shift * sf for m in range(8)] + [-m / 4 * shift * sf for m in range(8)]
            assert values[row].tolist() == expected, (sf, lv2_bit, lv3_bit)
            assert torch.signbit(values[row, 8]), "nibble 0x8 is -0.0 (spec §6)"
            magnitudes = (values[row].abs() / sf).tolist()
            assert set(magnitudes) <= set(MAGNITUDES)
            # every HiF4 value is an FP8 E4M3 value times the per-64 scale (spec §4)
            ratio = values[row] / sf
            assert torch.equal(ratio.to(torch.float8_e4m3fn).float(), ratio)


def test_nan_scale_code_poisons_the_block():
    encoded = Encoded(torch.zeros(1, 1, 64, dtype=torch.uint8),
                      {"scale": torch.full((1, 1), NAN_SCALE_CODE, dtype=torch.uint8),
                       "lv2": torch.zeros(1, 1, dtype=torch.int32), "lv3": torch.zeros(1, 1, dtype=torch.int32)})
    assert torch.isnan(decode(encoded, HIF4)).all()


def test_encoded_random_data_stays_in_the_value_set():
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(1)) * torch.logspace(-2, 2, 256)
    encoded = encode(x.reshape(512, 4, 64), HIF4)
    assert int(encoded.meta["scale"].max()) < NAN_SCALE_CODE
    sf = _e6m2_value(encoded.meta["scale"])[..., None]
    ratios = set((decode(encoded, HIF4).abs() / sf).flatten().tolist())
    assert ratios <= set(MAGNITUDES)
    assert len(ratios) == len(MAGNITUDES)


def _data(seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 320, generator=g) * torch.exp2(torch.randint(-12, 12, (96, 1), generator=g).float())
    x[::7, ::5] = 0.0
    x[3, :64] *= torch.exp2(torch.randint(-6, 6, (64,), generator=g).float())  # mixed scales in a block
    return x.to(dtype)


def _requantize_differs(once, twice):
    """Bitwise differences other than the signed-zero rule (Q turns an x = -0 into +0.0)."""
    return bitwise_mismatches(twice, once) & ~((once == 0) & torch.signbit(once))


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp4_ocp", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_power_of_two_and_e4m3_scaled_formats_are_idempotent(fmt, dtype):
    x = torch.randn(96, 320, generator=torch.Generator().manual_seed(2)).to(dtype)  # NVFP4 scales stay normal
    once = quantize_dequantize(x, fmt, backend="reference")
    twice = quantize_dequantize(once, fmt, backend="reference")
    assert not _requantize_differs(once, twice).any(), f"{fmt}: Q(Q(x)) != Q(x)"


def test_hif4_is_not_idempotent_but_q_of_q_is_a_fixed_point():
    """The reference HiF4 is not a projection (docs/formats.md): a maximum can round *up* (0.734 ->
    0.766 below) across the E6M2, lv2 or lv3 threshold, so re-quantizing picks a coarser exponent for
    that sub-block. What holds instead, on this seeded data: Q(Q(Q(x))) == Q(Q(x)).
    """
    x = _data(2, torch.float32)
    once = quantize_dequantize(x, "hif4", backend="reference")
    twice = quantize_dequantize(once, "hif4", backend="reference")
    thrice = quantize_dequantize(twice, "hif4", backend="reference")
    assert _requantize_differs(once, twice).any()
    assert not _requantize_differs(twice, thrice).any()
    block = torch.tensor([0.7345168590545654] + [0.0] * 63)
    assert quantize_dequantize(block, "hif4")[0].item() == 0.765625
    assert quantize_dequantize(torch.tensor([0.765625] + [0.0] * 63), "hif4")[0].item() == 0.765625


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hif4_on_grid_points_with_unchanged_scale_is_idempotent(dtype):
    """Blocks whose maximum is already on the grid of its own scale requantize to themselves."""
    g = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 8, (256, 64), generator=g).float() / 4  # S1P2 mantissas, lv2 = lv3 = 1
    codes[:, 0] = 1.75  # the max: 1.75 * sf with M*INV7 rounding back onto sf
    x = (codes * torch.where(torch.rand(256, 64, generator=g) < 0.5, -1.0, 1.0) * 4.0).to(dtype)
    once = quantize_dequantize(x, "hif4", backend="reference")
    assert not _requantize_differs(once, quantize_dequantize(once, "hif4", backend="reference")).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_odd_symmetry_up_to_signed_zero(dtype):
    x = _data(3, dtype)
    x[5, 9] = -0.0
    pos = quantize_dequantize(x, "hif4", backend="reference")
    neg = quantize_dequantize(-x, "hif4", backend="reference")
    differ = bitwise_mismatches(neg, -pos)
    # the only allowed difference: x = +-0 gives +0.0 on both sides (spec §3 step 10)
    assert torch.equal(differ, x == 0)
    assert not torch.signbit(neg[x == 0]).any()


@pytest.mark.parametrize("shift", [-30, -7, -1, 1, 5, 12])
def test_power_of_two_scaling_commutes_inside_the_range(shift):
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))  # block scales ~0.5, far from clips
    scale = 2.0**shift
    assert_bitexact(quantize_dequantize(x * scale, "hif4", backend="reference"),
                    quantize_dequantize(x, "hif4", backend="reference") * scale, f"2^{shift}")


def test_scaling_stops_commuting_at_the_scale_clip():
    """Sanity check that the property test can fail: past 49152 the scale saturates (spec §3 step 3)."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    big = 2.0**20
    assert bitwise_mismatches(quantize_dequantize(x * big, "hif4"), quantize_dequantize(x, "hif4") * big).any()
