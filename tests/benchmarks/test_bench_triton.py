"""GPU benchmarks of the triton backend (skipped without a CUDA GPU; name the card in the results).

    python -m pytest -o addopts="" tests/benchmarks/test_bench_triton.py --benchmark-only \
        --benchmark-json=triton.json && python experiments/bench_table.py triton.json

Group "fused quantize": HiF4, MXFP4 and NVFP4 (both variants each) quantize-dequantize of 32760 x 5120
bf16 (an A14B activation at 480p): torch clone (the HBM copy floor), the reference, the triton kernel.
Group "linear": M = 32760 tokens at
A14B shapes: BF16 F.linear (cuBLAS, the baseline), the unfused simulation (quantize x and W, then
F.linear), and the fused W4A4 kernel over packed weights.
"""

import pytest
import torch
import torch.nn.functional as F

from sensq.formats import quantize_dequantize

pytestmark = pytest.mark.gpu

M = 32760
SHAPES = {"5120x5120": (5120, 5120), "5120->13824": (5120, 13824), "13824->5120": (13824, 5120)}


@pytest.fixture(scope="module")
def activation():
    return torch.randn(M, 5120, device="cuda", dtype=torch.bfloat16)


def _sync(fn, *args, **kwargs):
    out = fn(*args, **kwargs)
    torch.cuda.synchronize()
    return out


def test_quantize_clone(benchmark, activation):
    benchmark.group = f"fused quantize {M}x5120 bf16 ({torch.cuda.get_device_name()})"
    benchmark.extra_info["baseline"] = True
    benchmark(_sync, activation.clone)


@pytest.mark.parametrize("fmt", ["hif4", "mxfp4", "mxfp4_ocp", "nvfp4", "nvfp4_ts"])
def test_quantize_reference(benchmark, activation, fmt):
    benchmark.group = f"fused quantize {M}x5120 bf16 ({torch.cuda.get_device_name()})"
    benchmark(_sync, quantize_dequantize, activation, fmt, backend="reference")


@pytest.mark.parametrize("fmt", ["hif4", "mxfp4", "mxfp4_ocp", "nvfp4", "nvfp4_ts"])
def test_quantize_triton(benchmark, activation, fmt):
    benchmark.group = f"fused quantize {M}x5120 bf16 ({torch.cuda.get_device_name()})"
    benchmark(_sync, quantize_dequantize, activation, fmt, backend="triton")


@pytest.fixture(scope="module", params=list(SHAPES))
def linear(request):
    k, n = SHAPES[request.param]
    x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    return request.param, x, weight


def test_linear_bf16_cublas(benchmark, linear):
    name, x, weight = linear
    benchmark.group = f"linear M={M} {name} ({torch.cuda.get_device_name()})"
    benchmark.extra_info["baseline"] = True
    benchmark(_sync, F.linear, x, weight)


def test_linear_unfused_simulation(benchmark, linear):
    name, x, weight = linear
    benchmark.group = f"linear M={M} {name} ({torch.cuda.get_device_name()})"
    w_q = quantize_dequantize(weight, "hif4")
    benchmark(lambda: _sync(F.linear, quantize_dequantize(x, "hif4"), w_q))


def test_linear_fused_w4a4(benchmark, linear):
    from sensq.kernels import triton_hif4

    name, x, weight = linear
    benchmark.group = f"linear M={M} {name} ({torch.cuda.get_device_name()})"
    blocks = triton_hif4.pack_blocks(weight, dim=1)
    benchmark.extra_info["weight_bytes_packed"] = blocks.numel()
    benchmark.extra_info["weight_bytes_bf16"] = weight.numel() * 2
    benchmark(_sync, triton_hif4.hif4_linear, x, blocks, None, weight.shape[0])
