"""Probe overhead and HDF5 write throughput (not in the default run).

    python -m pytest -o addopts="" tests/benchmarks/test_bench_probe.py --benchmark-only \
        --benchmark-json=probe.json && python experiments/bench_table.py probe.json

Group "probe overhead": the same 2 prompts x 4 CFG steps on tiny-realshape, plain generation
(baseline) vs ``run_probe`` (hooks, statistics, HDF5 writes), in one run. Group "probe overhead A14B
width": the same at A14B's layer widths (``load_a14b_width``: 1 block of 5120/13824 per expert, 2.3 GB
each), 1 prompt x the Lightning 4 steps (no CFG), 64x64x9 (192 video tokens) and 128x128x17 (1280).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from sensq.loading import load_model
from sensq.probes.recorder import ProbeRequest, run_probe
from sensq.prompts import load_prompts
from sensq.store.probe_writer import LayerShape, ProbeWriter
from sensq.trajectory import Step, Trajectory, apply_trajectory, run


@pytest.fixture(scope="module", params=[(64, 64, 9), (128, 128, 17), (256, 256, 33)],
                ids=["64x64x9", "128x128x17", "256x256x33"])
def realshape(request):
    model = load_model("tiny-realshape", torch.device("cpu"), torch.float32)
    height, width, frames = request.param
    trajectory = Trajectory(steps=4, height=height, width=width, frames=frames)
    return model, trajectory, load_prompts(None, 2)


def _group(trajectory) -> str:
    return f"probe overhead tiny-realshape {trajectory.height}x{trajectory.width}x{trajectory.frames} 4 CFG steps"


def test_generate_without_probe(benchmark, realshape):
    model, trajectory, prompts = realshape
    benchmark.group = _group(trajectory)
    benchmark.extra_info["baseline"] = True

    def generate():
        apply_trajectory(model.pipe, trajectory)
        for prompt in prompts:
            run(model.pipe, prompt.text, trajectory, seed=prompt.index)

    benchmark.pedantic(generate, rounds=7, warmup_rounds=1)


def test_generate_with_probe(benchmark, realshape, tmp_path):
    model, trajectory, prompts = realshape
    benchmark.group = _group(trajectory)
    out = tmp_path / "p.h5"

    def probe():
        run_probe(ProbeRequest(model, trajectory, prompts, ["high", "low"], out, overwrite=True))

    benchmark.pedantic(probe, rounds=7, warmup_rounds=1)


A14B_BLOCK = {  # in_features, tokens at 480p (S = 21 * 30 * 52 = 32760 video tokens, 512 text tokens)
    "attn1.to_q": (5120, 32760), "attn1.to_k": (5120, 32760), "attn1.to_v": (5120, 32760),
    "attn1.to_out.0": (5120, 32760), "attn2.to_q": (5120, 32760), "attn2.to_k": (5120, 512),
    "attn2.to_v": (5120, 512), "attn2.to_out.0": (5120, 32760), "ffn.net.0.proj": (5120, 32760),
    "ffn.net.2": (13824, 32760),
}


@pytest.fixture(scope="module")
def a14b_width():
    from sensq.models import load_a14b_width

    return load_a14b_width(num_layers=1)


A14B_RESOLUTIONS = pytest.mark.parametrize("resolution", [(64, 64, 9), (128, 128, 17)], ids=["192tok", "1280tok"])


def _a14b_case(model, resolution):
    from sensq.trajectory import get_preset

    height, width, frames = resolution
    trajectory = get_preset("lightning-4step").with_resolution((height, width, frames))
    return trajectory, f"probe overhead A14B width {height}x{width}x{frames} lightning 4 steps", load_prompts(None, 1)


@A14B_RESOLUTIONS
def test_a14b_width_generate_without_probe(benchmark, a14b_width, resolution):
    trajectory, group, prompts = _a14b_case(a14b_width, resolution)
    benchmark.group = group
    benchmark.extra_info["baseline"] = True

    def generate():
        apply_trajectory(a14b_width.pipe, trajectory)
        run(a14b_width.pipe, prompts[0].text, trajectory, seed=0)

    benchmark.pedantic(generate, rounds=3, warmup_rounds=1)


@A14B_RESOLUTIONS
def test_a14b_width_generate_with_probe(benchmark, a14b_width, resolution, tmp_path):
    trajectory, group, prompts = _a14b_case(a14b_width, resolution)
    benchmark.group = group
    out = tmp_path / "p.h5"

    def probe():
        run_probe(ProbeRequest(a14b_width, trajectory, prompts, ["high", "low"], out, overwrite=True))

    benchmark.pedantic(probe, rounds=3, warmup_rounds=1)


def test_hdf5_write_throughput(benchmark, tmp_path):
    """One step of 4 A14B blocks (40 Linears at real widths and token counts, 32 sampled rows)."""
    benchmark.group = "probe HDF5 write, 4 A14B blocks, 1 step"
    benchmark.extra_info["baseline"] = True
    layers = {f"blocks.{b}.{name}": LayerShape("linear", c, 5120, c * 5120, t, np.arange(32))
              for b in range(4) for name, (c, t) in A14B_BLOCK.items()}
    rng = np.random.default_rng(0)
    sizes = {"channel_absmax": sum(s.in_features for s in layers.values()),
             "token_absmax": sum(s.tokens for s in layers.values()),
             "samples": sum(32 * s.in_features for s in layers.values())}
    data = {stat: rng.random((1, size), dtype=np.float32) for stat, size in sizes.items()}
    nbytes = sum(a.nbytes for a in data.values())
    benchmark.extra_info["bytes_per_step"] = nbytes
    writer = ProbeWriter.create(Path(tmp_path / "w.h5"), attrs={}, prompts=load_prompts(None, 1), seeds=[0],
                                steps=[Step(0, 999.0, 1.0, "high")], expert_steps={"high": [0]}, branches=("cond",))
    writer.create_layers("high", layers, {})
    benchmark(writer.write_step, 0, "high", 0, data, {})
    writer.close()
