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
