"""Cost of --metric mse against plain F.linear on the same captured samples (not in the default run).

    python -m pytest -o addopts="" tests/benchmarks/test_bench_rank.py --benchmark-only \
        --benchmark-json=rank.json && python experiments/bench_table.py rank.json

A14B layer shapes; 1024 sample rows (e.g. 16 prompts x 2 steps x 1 branch x 32 rows). The mse
score needs the full-precision GEMM (the baseline itself), the W4A4 GEMM, and the quantization of
the weight and of the rows; with outputs recorded by the probe (``--outputs``) the first GEMM is not run.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sensq.formats import get_format
from sensq.sensitivity.local import layer_scores

SHAPES = {"attn 5120x5120": (5120, 5120), "ffn.net.0 5120->13824": (5120, 13824),
          "ffn.net.2 13824->5120": (13824, 5120)}
ROWS = 1024


@pytest.fixture(scope="module", params=list(SHAPES))
def layer(request):
    fan_in, fan_out = SHAPES[request.param]
    torch.manual_seed(0)
    linear = torch.nn.Linear(fan_in, fan_out)
    samples = np.random.default_rng(0).standard_normal((16, 2, 1, ROWS // 32, fan_in), dtype=np.float32)
    layer_scores(linear, samples[:1, :1], [get_format("hif4")], "mse")  # compile the cpu kernel first
    return request.param, linear, samples


def test_plain_linear(benchmark, layer):
    name, linear, samples = layer
    benchmark.group = f"rank mse cost, {name}, {ROWS} rows"
    benchmark.extra_info["baseline"] = True
    x = torch.from_numpy(samples.reshape(-1, samples.shape[-1]))
    with torch.no_grad():
        benchmark.pedantic(F.linear, args=(x, linear.weight, linear.bias), rounds=5, warmup_rounds=1)


def test_mse_score(benchmark, layer):
    name, linear, samples = layer
    benchmark.group = f"rank mse cost, {name}, {ROWS} rows"
    with torch.no_grad():
        benchmark.pedantic(layer_scores, args=(linear, samples, [get_format("hif4")], "mse"), rounds=5,
                           warmup_rounds=1)


def test_mse_score_with_recorded_outputs(benchmark, layer):
    """``sensq probe --outputs``: the full-precision outputs come from the probe, only the W4A4 GEMM runs."""
    name, linear, samples = layer
    benchmark.group = f"rank mse cost, {name}, {ROWS} rows"
    with torch.no_grad():
        outputs = F.linear(torch.from_numpy(samples), linear.weight, linear.bias).numpy()
        benchmark.pedantic(layer_scores, args=(linear, samples, [get_format("hif4")], "mse"),
                           kwargs={"outputs": outputs}, rounds=5, warmup_rounds=1)
