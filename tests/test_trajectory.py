import pytest
import torch

from sensq.errors import InputError
from sensq.loading import load_model
from sensq.trajectory import Trajectory, apply_trajectory, get_preset, plan_steps, run


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", torch.device("cpu"), torch.float32)


def test_lightning_preset_reproduces_the_training_timesteps(tiny):
    trajectory = get_preset("lightning-4step")
    apply_trajectory(tiny.pipe, trajectory)
    steps = plan_steps(tiny.pipe, tiny.family, trajectory)
    assert [round(s.timestep, 1) for s in steps] == [1000.0, 937.5, 833.3, 625.0]
    assert [s.expert for s in steps] == ["high", "high", "low", "low"]
    assert not trajectory.cfg and trajectory.branches == ("cond",)


def test_plain_euler_shift5_is_not_lightning(tiny):
    trajectory = Trajectory(steps=4, scheduler="euler", shift=5.0, guidance=1.0)
    apply_trajectory(tiny.pipe, trajectory)
    timesteps = [round(s.timestep, 1) for s in plan_steps(tiny.pipe, tiny.family, trajectory)]
    assert timesteps != [1000.0, 937.5, 833.3, 625.0] and timesteps[0] == 1000.0


def test_unipc_shift3_routing(tiny):
    trajectory = Trajectory(steps=8, scheduler="unipc", shift=3.0)
    apply_trajectory(tiny.pipe, trajectory)
    steps = plan_steps(tiny.pipe, tiny.family, trajectory)
    assert [s.expert for s in steps].count("high") == 3
    assert all((s.timestep >= 875) == (s.expert == "high") for s in steps)


def test_the_pipeline_runs_the_planned_steps_on_the_planned_experts(tiny):
    trajectory = get_preset("lightning-4step").with_resolution(tiny.default_resolution)
    apply_trajectory(tiny.pipe, trajectory)
    seen = []
    handles = [
        getattr(tiny.pipe, attr).register_forward_pre_hook(
            lambda m, a, kw, name=name: seen.append((name, float(kw["timestep"][0]))), with_kwargs=True)
        for name, attr in (("high", "transformer"), ("low", "transformer_2"))
    ]
    try:
        run(tiny.pipe, "a red ball", trajectory)
    finally:
        for handle in handles:
            handle.remove()
    planned = [(s.expert, round(s.timestep, 1)) for s in plan_steps(tiny.pipe, tiny.family, trajectory)]
    assert [(e, round(t, 1)) for e, t in seen] == planned  # guidance 1: one forward per step


def test_cfg_runs_two_forwards_per_step(tiny):
    trajectory = Trajectory(steps=2, guidance=4.0).with_resolution(tiny.default_resolution)
    apply_trajectory(tiny.pipe, trajectory)
    calls = []
    handle = tiny.pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    handle2 = tiny.pipe.transformer_2.register_forward_pre_hook(lambda m, a: calls.append(2))
    try:
        run(tiny.pipe, "a cat", trajectory)
    finally:
        handle.remove()
        handle2.remove()
    assert len(calls) == 4


def test_round_trip_dict():
    trajectory = get_preset("lightning-4step")
    assert Trajectory.from_dict(trajectory.to_dict()) == trajectory
    assert trajectory.digest() != Trajectory().digest()


@pytest.mark.parametrize("kwargs,message", [
    ({"steps": 0}, "--steps must be at least 1"),
    ({"scheduler": "ddim"}, "unknown scheduler 'ddim'; use one of unipc, euler"),
    ({"sigmas": (1.0, 0.5)}, "--sigmas needs --scheduler euler"),
    ({"scheduler": "euler", "steps": 3, "sigmas": (1.0, 0.5)}, "--sigmas has 2 values but --steps is 3"),
    ({"height": 30}, "--height must be a positive multiple of 16, got 30"),
    ({"frames": 8}, "--frames must be 4k\\+1"),
    ({"guidance": 0.5}, "--guidance must be >= 1"),
])
def test_bad_trajectories(kwargs, message):
    with pytest.raises(InputError, match=message):
        Trajectory(**kwargs)


def test_unknown_preset():
    with pytest.raises(InputError, match="unknown preset 'fast'; presets: lightning-4step"):
        get_preset("fast")
