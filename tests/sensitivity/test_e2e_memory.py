"""The e2e sweep holds at most one group's quantized twins (leave-one-in) or packed twins only
(leave-one-out), and its scores equal a sweep with every dense twin built up front."""

import gc

import pytest
import torch

from sensq.formats import get_format
from sensq.loading import load_model
from sensq.metrics import nmse
from sensq.models.layers import quantizable_layers
from sensq.models.wan import WAN22_A14B
from sensq.quant import QuantLinear, QuantPatchConv3d, quantize_module, swap
from sensq.quant.deployed import PackedLinear, is_deployed
from sensq.sensitivity.e2e import E2EJob, e2e_scores, final_latents, layer_groups
from sensq.trajectory import Trajectory, apply_trajectory


@pytest.fixture(scope="module")
def setup():
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    trajectory = Trajectory(steps=2, guidance_2=None).with_resolution(model.default_resolution)
    job = E2EJob(trajectory, ["a red circle"], [1], [""])
    expert = model.family.expert_module(model.pipe, "low")
    # the patch Conv3d, two blocks (block groups of several layers) and proj_out: every kind, a short sweep
    layers = [name for name, _ in quantizable_layers(expert)
              if not name.startswith(("condition_embedder", "blocks.0."))]
    return model, job, expert, layers


def _dense_twins_alive() -> int:
    gc.collect()
    return sum(isinstance(o, (QuantLinear, QuantPatchConv3d)) for o in gc.get_objects())


def _upfront_leave_one_in(pipe, expert, layers, job, fmt, granularity):
    """The sweep as it was: every dense twin built before scoring."""
    apply_trajectory(pipe, job.trajectory)
    reference = final_latents(pipe, job)
    twins = {name: quantize_module(expert.get_submodule(name), fmt, fmt) for name in layers}
    originals = {name: expert.get_submodule(name) for name in layers}
    scores = {}
    for group, names in layer_groups(layers, granularity, WAN22_A14B):
        for name in names:
            swap(expert, name, twins[name])
        latents = final_latents(pipe, job)
        scores[group] = sum(nmse(r, x) for r, x in zip(reference, latents, strict=True)) / len(reference)
        for name in names:
            swap(expert, name, originals[name])
    return scores


@pytest.mark.parametrize("granularity", ["block"])  # block groups hold several layers; layer is the 1-layer case
def test_leave_one_in_builds_one_group_at_a_time_and_scores_the_same(setup, granularity):
    model, job, expert, layers = setup
    fmt = get_format("hif4")
    groups = dict(layer_groups(layers, granularity, model.family))
    alive = []

    def progress(done, total):
        alive.append(_dense_twins_alive())

    baseline = _dense_twins_alive()
    scores = e2e_scores(model.pipe, expert, layers, job, fmt, family=model.family, granularity=granularity,
                        progress=progress)
    assert alive and max(alive) - baseline <= max(len(names) for names in groups.values())
    assert _dense_twins_alive() == baseline  # nothing left behind
    assert scores == _upfront_leave_one_in(model.pipe, expert, layers, job, fmt, granularity)


def test_leave_one_out_holds_packed_twins_only(setup):
    model, job, expert, layers = setup
    fmt = get_format("hif4")
    seen = []

    def progress(done, total):
        seen.append((sum(is_deployed(m) for m in expert.modules()),
                     sum(isinstance(m, (QuantLinear, QuantPatchConv3d)) for m in expert.modules())))

    scores = e2e_scores(model.pipe, expert, layers, job, fmt, family=model.family, mode="leave-one-out",
                        progress=progress)
    assert all(dense == 0 and packed == len(layers) for packed, dense in seen)  # swapped back before progress
    assert set(scores) == set(layers) and not any(is_deployed(m) for m in expert.modules())
    # every layer quantized: the packed twins give the simulation's latents exactly
    twins = {name: quantize_module(expert.get_submodule(name), fmt, fmt) for name in layers}
    originals = {name: expert.get_submodule(name) for name in layers}
    apply_trajectory(model.pipe, job.trajectory)
    for name in layers:
        swap(expert, name, twins[name])
    dense = final_latents(model.pipe, job)
    for name in layers:
        swap(expert, name, PackedLinear.from_quant(twins[name]) if isinstance(twins[name], QuantLinear)
             else twins[name])
    packed = final_latents(model.pipe, job)
    for name in layers:
        swap(expert, name, originals[name])
    assert all(torch.equal(a, b) for a, b in zip(dense, packed, strict=True))
