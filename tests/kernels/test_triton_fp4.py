"""The triton MXFP4/NVFP4 kernels against the reference: bit-exact quantize-dequantize and encode, golden pairs,
and the correctly rounded floor(log2) rule they use instead of tl.log2.

On CPU the kernels run under TRITON_INTERPRET=1 with small shapes; real shapes are marked ``gpu``.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")  # without a GPU, tests/conftest.py has set TRITON_INTERPRET=1

from conftest import awkward_tensor, golden_cases, load_golden  # noqa: E402

from sensq.formats import get_format, quantize_dequantize  # noqa: E402
from sensq.formats.blocks import to_blocks  # noqa: E402
from sensq.formats.reference import encode  # noqa: E402
from sensq.kernels import triton_fp4  # noqa: E402
from sensq.testing import assert_bitexact  # noqa: E402

# the interpreter runs the kernels on numpy arrays, which warn on the divisions by zero and the all-NaN blocks
# that the kernels handle on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

FP4 = ["mxfp4", "mxfp4_ocp", "nvfp4", "nvfp4_ts"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _awkward(shape, seed=0, dtype=torch.float32):
    """Wider magnitudes than the HiF4 tests, and values next to powers of two and on E2M1 ties."""
    return awkward_tensor(shape, seed, dtype, spread=30, boundaries=True)


@pytest.mark.parametrize("name", [n for n in golden_cases() if load_golden(n)[2]["format"] in ("mxfp4", "nvfp4")])
def test_golden(name):
    x, expected, meta = load_golden(name)
    got = quantize_dequantize(x.to(DEVICE), meta["format"], dim=meta["axis"], backend="triton").cpu()
    assert_bitexact(got, expected, name)


@pytest.mark.parametrize("fmt", FP4)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape,dim", [((1, 1), -1), ((3, 33), -1), ((100, 130), -1), ((130, 7), 0),
                                       ((2, 65, 17), 1)])
def test_quantize_equals_reference(fmt, dtype, shape, dim):
    x = _awkward(shape, seed=sum(shape), dtype=dtype)
    assert_bitexact(quantize_dequantize(x.to(DEVICE), fmt, dim=dim, backend="triton").cpu(),
                    quantize_dequantize(x, fmt, dim=dim, backend="reference"), f"{fmt} {shape} {dtype}")


@pytest.mark.parametrize("fmt", FP4)
def test_many_random_bit_patterns(fmt):
    """200k float32 bit patterns (every exponent, subnormals, inf, NaN) in blocks of their own scale."""
    g = torch.Generator().manual_seed(7)
    bits = torch.randint(-(2**31), 2**31 - 1, (1600, 128), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    assert_bitexact(quantize_dequantize(x.to(DEVICE), fmt, backend="triton").cpu(),
                    quantize_dequantize(x, fmt, backend="reference"), fmt)


@pytest.mark.parametrize("fmt", FP4)
@pytest.mark.parametrize("shape", [(5, 100), (3, 32), (17, 48), (1, 1)])
def test_encode_fields_equal_the_reference_encoding(fmt, shape):
    spec = get_format(fmt)
    x = _awkward(shape, seed=3)
    codes, scale, tensor_scale = triton_fp4.encode_fields(x.to(DEVICE), spec, dim=1)
    expected = encode(to_blocks(x, 1, spec.block_size)[0], spec)
    assert torch.equal(codes.cpu(), expected.codes)
    assert torch.equal(scale.cpu(), expected.meta["scale"])
    if fmt == "nvfp4_ts":
        assert tensor_scale == expected.meta["tensor_scale"].item()


def test_floor_log2_rule_matches_torch_next_to_every_power_of_two():
    """torch's float32 log2 is correctly rounded, so just below 2^k it rounds up to k for k >= 3 (and for
    k <= -2): the floor there is not the exponent field. The threshold table reproduces that exactly."""
    from sensq.kernels.fp4_common import log2_floor_thresholds

    thresholds = log2_floor_thresholds()
    ys = []
    for e in range(-126, 128):
        top = np.array(np.float32(2.0) ** np.float32(e + 1) if e < 127 else np.finfo(np.float32).max,
                       dtype=np.float32).view(np.int32)
        ys.append((top - np.arange(0 if e == 127 else 1, 600)).astype(np.int32).view(np.float32))
    y = np.concatenate(ys)
    exponent = ((y.view(np.int32) >> 23) & 0xFF).astype(np.int64) - 127
    rule = exponent + (y >= thresholds[exponent + 126])
    expected = torch.floor(torch.log2(torch.from_numpy(y))).numpy().astype(np.int64)
    assert np.array_equal(rule, expected)
    assert (rule != exponent).sum() > 1000  # the rule matters: the exponent field alone would be wrong here


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FP4)
@pytest.mark.parametrize("m", [1, 100, 32760])
def test_real_shapes_on_gpu(fmt, m):
    """Against the reference run on the CPU: that is the definition (the golden data's float32 torch). On CUDA
    the reference's own torch.log2 is log2f (within 1 ulp, not always correctly rounded), the kernel's rule is not."""
    x = torch.randn(m, 5120, device="cuda", dtype=torch.bfloat16)
    assert_bitexact(quantize_dequantize(x, fmt, backend="triton").cpu(),
                    quantize_dequantize(x.cpu(), fmt, backend="reference"), fmt)
