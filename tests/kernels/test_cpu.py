"""The numba ``cpu`` backend against the reference, bit for bit (golden pairs: tests/formats/test_golden.py)."""

import pytest
import torch

from sensq.formats import quantize_dequantize
from sensq.testing import assert_bitexact

pytest.importorskip("numba")


def _stress(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-40, 40, shape, generator=g).float() / 4)
    flat = x.view(-1)
    n = flat.numel()
    idx = torch.randint(0, n, (max(1, n // 500),), generator=g)
    flat[idx[0::5]] = 0.0
    flat[idx[1::5]] = -0.0
    flat[idx[2::5]] = float("nan") if n > 10_000 else 0.0
    flat[idx[3::5]] = float("inf")
    flat[idx[4::5]] = 1e-40  # subnormal input
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape,dim", [((1, 1), -1), ((3, 63), -1), ((257, 1000), -1), ((1000, 257), 0),
                                       ((2, 65, 129), 1), ((4096, 512), -1)])
def test_cpu_equals_reference(dtype, shape, dim):
    x = _stress(shape, dtype, seed=sum(shape))
    assert_bitexact(quantize_dequantize(x, "hif4", dim=dim, backend="cpu"),
                    quantize_dequantize(x, "hif4", dim=dim, backend="reference"), f"{shape} {dtype}")


def test_cpu_equals_reference_on_random_bit_patterns():
    """Every kind of float32: random bit patterns, 2M elements (NaN and Inf included)."""
    bits = torch.randint(-(2**31), 2**31 - 1, (2048, 1024), generator=torch.Generator().manual_seed(7),
                         dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    # rescale most blocks into a sane range so that not every block is NaN- or Inf-poisoned
    finite = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    mixed = torch.where(torch.rand(2048, 1, generator=torch.Generator().manual_seed(8)) < 0.2, x, finite)
    assert_bitexact(quantize_dequantize(mixed, "hif4", backend="cpu"),
                    quantize_dequantize(mixed, "hif4", backend="reference"), "random bits")


def test_cpu_equals_reference_on_bf16_bit_patterns():
    """All 65536 bfloat16 bit patterns, each block padded by other patterns."""
    all_bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = all_bits.view(torch.bfloat16).reshape(-1, 256)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)  # keep most blocks NaN-free
    assert_bitexact(quantize_dequantize(x, "hif4", backend="cpu"),
                    quantize_dequantize(x, "hif4", backend="reference"), "bf16 patterns")


# --- MXFP4 / NVFP4, INT and FP8 (kernels/numba_blocks.py) ----------------------------------------------------

FP4 = ["mxfp4", "mxfp4_ocp", "nvfp4", "nvfp4_ts"]
SCALED = ["int4", "int8", "fp8_e4m3"]


def _near_boundaries(shape, seed):
    """Values just below powers of two (where floor(log2) rounds up), six times such values (so that NVFP4's
    amax / 6 is one) and values on E2M1 rounding ties."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.tensor(shape).prod())
    powers = torch.exp2(torch.randint(-30, 30, (n,), generator=g).float())
    below = powers * (1 - 2.0**-24 * torch.randint(0, 6, (n,), generator=g).float())
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])[torch.randint(0, 7, (n,), generator=g)] * powers
    pick = torch.rand(n, generator=g)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    value = torch.where(pick < 0.4, below, torch.where(pick < 0.8, below * 6, ties))
    return (value * sign).reshape(shape)


@pytest.mark.parametrize("fmt", FP4 + SCALED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape,dim", [((1, 1), -1), ((3, 33), -1), ((257, 1000), -1), ((1000, 257), 0),
                                       ((2, 65, 129), 1)])
def test_fp4_cpu_equals_reference(fmt, dtype, shape, dim):
    x = _stress(shape, dtype, seed=sum(shape))
    assert_bitexact(quantize_dequantize(x, fmt, dim=dim, backend="cpu"),
                    quantize_dequantize(x, fmt, dim=dim, backend="reference"), f"{fmt} {shape} {dtype}")


@pytest.mark.parametrize("fmt", FP4 + SCALED)
def test_fp4_cpu_equals_reference_next_to_powers_of_two_and_ties(fmt):
    x = _near_boundaries((512, 256), seed=5)
    assert_bitexact(quantize_dequantize(x, fmt, backend="cpu"), quantize_dequantize(x, fmt, backend="reference"),
                    fmt)


@pytest.mark.parametrize("fmt", FP4 + SCALED)
def test_fp4_cpu_equals_reference_on_random_bit_patterns(fmt):
    bits = torch.randint(-(2**31), 2**31 - 1, (2048, 1024), generator=torch.Generator().manual_seed(7),
                         dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    finite = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    mixed = torch.where(torch.rand(2048, 1, generator=torch.Generator().manual_seed(8)) < 0.2, x, finite)
    assert_bitexact(quantize_dequantize(mixed, fmt, backend="cpu"),
                    quantize_dequantize(mixed, fmt, backend="reference"), f"{fmt} random bits")


@pytest.mark.parametrize("fmt", FP4 + SCALED)
def test_fp4_cpu_equals_reference_on_bf16_bit_patterns(fmt):
    all_bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = all_bits.view(torch.bfloat16).reshape(-1, 256)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    assert_bitexact(quantize_dequantize(x, fmt, backend="cpu"), quantize_dequantize(x, fmt, backend="reference"),
                    f"{fmt} bf16 patterns")
