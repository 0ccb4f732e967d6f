"""HiF4 speed: the reference, the numba cpu backend and the memory-copy floor, in one run; the other formats
(MXFP4, NVFP4, INT, FP8): the numba cpu backend against the reference (the baseline of those groups).

Run (not part of the default test run):
    python -m pytest -o addopts="" tests/benchmarks --benchmark-only --benchmark-json=bench.json
    python experiments/bench_table.py bench.json      # ratios to the baseline of each group
Each group's baseline is its ``clone`` (the memory-copy floor) or, for packing, ``quantize_dequantize``.
"""

import pytest
import torch

from sensq.formats import pack, quantize_dequantize, unpack

SHAPE = (4096, 4096)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module", params=list(DTYPES))
def tensor(request):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(DTYPES[request.param])
    quantize_dequantize(x[:64], "hif4", backend="cpu")  # compile the numba kernel outside the timing
    return request.param, x


def test_clone(benchmark, tensor):
    name, x = tensor
    benchmark.group = f"hif4 qdq {name} 4096x4096"
    benchmark.extra_info["baseline"] = True
    benchmark(x.clone)


def test_cpu_backend(benchmark, tensor):
    name, x = tensor
    benchmark.group = f"hif4 qdq {name} 4096x4096"
    benchmark(quantize_dequantize, x, "hif4", backend="cpu")


def test_reference(benchmark, tensor):
    name, x = tensor
    benchmark.group = f"hif4 qdq {name} 4096x4096"
    benchmark.pedantic(quantize_dequantize, args=(x, "hif4"), kwargs={"backend": "reference"}, rounds=3)


def test_pack_baseline_qdq(benchmark, tensor):
    name, x = tensor
    benchmark.group = f"hif4 pack/unpack {name} 4096x4096"
    benchmark.extra_info["baseline"] = True
    benchmark.pedantic(quantize_dequantize, args=(x, "hif4"), kwargs={"backend": "reference"}, rounds=3)


def test_pack(benchmark, tensor):
    name, x = tensor
    benchmark.group = f"hif4 pack/unpack {name} 4096x4096"
    benchmark.pedantic(pack, args=(x, "hif4"), rounds=3)


def test_unpack(benchmark, tensor):
    name, x = tensor
    benchmark.group = f"hif4 pack/unpack {name} 4096x4096"
    packed = pack(x, "hif4")
    benchmark.pedantic(unpack, args=(packed,), rounds=3)


OTHER_FORMATS = ["mxfp4", "mxfp4_ocp", "nvfp4", "nvfp4_ts", "int4", "int8", "fp8_e4m3"]  # every cpu format besides hif4


@pytest.fixture(scope="module")
def fp32_tensor():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for fmt in OTHER_FORMATS:
        quantize_dequantize(x[:64], fmt, backend="cpu")  # compile outside the timing
    return x


@pytest.mark.parametrize("fmt", OTHER_FORMATS)
def test_other_format_reference(benchmark, fp32_tensor, fmt):
    benchmark.group = f"{fmt} qdq fp32 4096x4096"
    benchmark.extra_info["baseline"] = True
    benchmark.pedantic(quantize_dequantize, args=(fp32_tensor, fmt), kwargs={"backend": "reference"}, rounds=3)


@pytest.mark.parametrize("fmt", OTHER_FORMATS)
def test_other_format_cpu_backend(benchmark, fp32_tensor, fmt):
    benchmark.group = f"{fmt} qdq fp32 4096x4096"
    benchmark.pedantic(quantize_dequantize, args=(fp32_tensor, fmt), kwargs={"backend": "cpu"}, rounds=5)
