"""sensq probe: what is recorded, that it is right, that hooks change nothing, errors, kill -9 + resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sensq.cli import main
from sensq.errors import InputError
from sensq.loading import load_model
from sensq.probes.capture import ProbeConfig
from sensq.probes.recorder import ProbeRequest, run_probe
from sensq.prompts import load_prompts
from sensq.store.probe_file import ProbeFile
from sensq.trajectory import Trajectory, apply_trajectory, get_preset, run

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", CPU, torch.float32)


def _request(tiny, out, trajectory=None, experts=("high", "low"), n_prompts=2, **kwargs):
    trajectory = (trajectory or Trajectory(steps=4)).with_resolution(tiny.default_resolution)
    return ProbeRequest(tiny, trajectory, load_prompts(None, n_prompts), list(experts), Path(out), **kwargs)


def test_records_every_layer_per_step_and_branch(tiny, tmp_path):
    result = run_probe(_request(tiny, tmp_path / "p.h5"))
    assert result.steps == {"high": [0, 1], "low": [2, 3]} and result.branches == ["cond", "uncond"]
    with ProbeFile(tmp_path / "p.h5") as probe:
        assert probe.done.all() and probe.experts == ["high", "low"]
        assert probe.model_fingerprint == tiny.fingerprint
        layers = probe.layers("high")
        assert layers[0] == "patch_embedding" and layers[-1] == "proj_out" and len(layers) == 27
        assert [row["expert"] for row in probe.trajectory_table()] == ["high", "high", "low", "low"]
        q = probe.read("high", "blocks.0.attn1.to_q", "channel_absmax")
        assert q.shape == (2, 2, 2, 32) and (q > 0).all()
        k_text = probe.read("low", "blocks.1.attn2.to_k", "token_absmax")
        assert k_text.shape == (2, 2, 2, 512)
        # text path: cond sees the prompt, uncond the (empty) negative prompt
        assert not np.array_equal(k_text[:, :, 0], k_text[:, :, 1])
        assert probe.layer_attrs("high", "patch_embedding")["in_features"] == 64
        assert probe.first_block("low", "hidden_states").shape == (2, 2, 2, 12, 32)


def test_recorded_statistics_equal_an_independent_capture(tiny, tmp_path):
    """Recompute blocks.1.ffn.net.2's input with a plain torch hook on an unhooked run."""
    run_probe(_request(tiny, tmp_path / "p.h5", n_prompts=1))
    trajectory = Trajectory(steps=4).with_resolution(tiny.default_resolution)
    apply_trajectory(tiny.pipe, trajectory)
    inputs = []
    layer = tiny.pipe.transformer_2.blocks[1].ffn.net[2]
    handle = layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    try:
        run(tiny.pipe, load_prompts(None, 1)[0].text, trajectory, seed=0)
    finally:
        handle.remove()
    # low expert: steps 2 and 3, each cond then uncond
    with ProbeFile(tmp_path / "p.h5") as probe:
        channel = probe.read("low", "blocks.1.ffn.net.2", "channel_absmax")[0]
        token = probe.read("low", "blocks.1.ffn.net.2", "token_absmax")[0]
        samples = probe.read("low", "blocks.1.ffn.net.2", "samples")[0]
        rows = probe.layer_attrs("low", "blocks.1.ffn.net.2")["sample_rows"]
    for k, x in enumerate(inputs):
        step, branch = divmod(k, 2)
        np.testing.assert_array_equal(channel[step, branch], x.abs().amax(0).numpy())
        np.testing.assert_array_equal(token[step, branch], x.abs().amax(1).numpy())
        np.testing.assert_array_equal(samples[step, branch], x[torch.from_numpy(rows)].numpy())


def test_hooks_leave_the_generation_bit_identical_and_are_removed(tiny, tmp_path):
    trajectory = Trajectory(steps=4).with_resolution(tiny.default_resolution)
    apply_trajectory(tiny.pipe, trajectory)
    forward_before = tiny.pipe.transformer.blocks[0].attn1.to_q.forward
    reference = run(tiny.pipe, "a red ball", trajectory, seed=3)
    from sensq.probes.capture import ProbeSession, apply_probe, remove_probe

    session = ProbeSession(ProbeConfig(), trajectory.branches, tiny.family)
    apply_probe(tiny.pipe.transformer, "high", session)
    steps_seen = []

    def take(pipe, i, t, kw):
        if i < 2:
            steps_seen.append(session.take_step(i).step)
        return kw

    try:
        probed = run(tiny.pipe, "a red ball", trajectory, seed=3, callback=take)
    finally:
        remove_probe(tiny.pipe.transformer)
    assert torch.equal(probed, reference)
    assert steps_seen == [0, 1]
    assert tiny.pipe.transformer.blocks[0].attn1.to_q.forward == forward_before
    assert torch.equal(run(tiny.pipe, "a red ball", trajectory, seed=3), reference)


def test_guidance_one_records_one_branch(tiny, tmp_path):
    result = run_probe(_request(tiny, tmp_path / "p.h5", trajectory=get_preset("lightning-4step"), n_prompts=1))
    assert result.branches == ["cond"]
    with ProbeFile(tmp_path / "p.h5") as probe:
        assert probe.read("high", "proj_out", "channel_absmax").shape[2] == 1


def test_single_expert(tiny, tmp_path):
    result = run_probe(_request(tiny, tmp_path / "p.h5", experts=("low",), n_prompts=1))
    assert result.experts == ["low"] and result.layers == {"low": 27}
    with ProbeFile(tmp_path / "p.h5") as probe:
        assert probe.experts == ["low"] and list(probe.steps("low")) == [2, 3]


def test_existing_output_needs_resume_or_overwrite(tiny, tmp_path):
    out = tmp_path / "p.h5"
    run_probe(_request(tiny, out, n_prompts=1))
    with pytest.raises(InputError, match="exists; pass --resume to complete it or --overwrite to replace it"):
        run_probe(_request(tiny, out, n_prompts=1))
    assert run_probe(_request(tiny, out, n_prompts=1, resume=True)).prompts_skipped == 1
    assert run_probe(_request(tiny, out, n_prompts=1, overwrite=True)).prompts_run == 1
    with pytest.raises(InputError, match="was made with a different model, trajectory, prompt list or probe config"):
        run_probe(_request(tiny, out, n_prompts=2, resume=True))


def test_schedule_that_never_reaches_the_expert(tiny, tmp_path):
    with pytest.raises(InputError, match="never routes a step to the 'low' expert \\(timesteps 999; boundary t=875\\)"):
        run_probe(_request(tiny, tmp_path / "p.h5", trajectory=Trajectory(steps=1), experts=("low",)))


def test_unknown_expert_and_bad_output(tiny, tmp_path):
    with pytest.raises(InputError, match="unknown expert 'mid'; this model has: high, low"):
        run_probe(_request(tiny, tmp_path / "p.h5", experts=("mid",)))
    with pytest.raises(InputError, match="output folder '.*nope' does not exist"):
        run_probe(_request(tiny, tmp_path / "nope" / "p.h5"))


def test_unwritable_output(tiny, tmp_path, monkeypatch):
    import sensq.probes.recorder as recorder

    # chmod does not stop root (CI runs as root): make the permission check itself say no
    monkeypatch.setattr(recorder.os, "access", lambda path, mode: False)
    with pytest.raises(InputError, match=f"output folder {str(tmp_path)!r} is not writable"):
        run_probe(_request(tiny, tmp_path / "p.h5"))


def test_probe_file_errors(tmp_path):
    with pytest.raises(InputError, match="probe file not found"):
        ProbeFile(tmp_path / "none.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(InputError, match="is not an HDF5 file"):
        ProbeFile(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["schema"] = "something/2"
    with pytest.raises(InputError, match="has schema 'something/2'; expected 'sensq.probe/1'"):
        ProbeFile(tmp_path / "other.h5")


def test_cli_probe_json_and_errors(tmp_path):
    runner = CliRunner()
    out = tmp_path / "p.h5"
    result = runner.invoke(main, ["probe", "--expert", "high", "--limit", "1", "--steps", "2", "--out", str(out),
                                  "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["experts"] == ["high"] and summary["prompts_run"] == 1 and summary["steps"] == {"high": [0]}
    again = runner.invoke(main, ["probe", "--expert", "high", "--limit", "1", "--steps", "2", "--out", str(out)])
    assert again.exit_code == 1
    assert again.output.strip().splitlines()[-1] == (
        f"Error: {str(out)!r} exists; pass --resume to complete it or --overwrite to replace it")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    bad = runner.invoke(main, ["probe", "--prompts", str(empty), "--out", str(tmp_path / "q.h5")])
    assert bad.exit_code == 1 and f"prompt file {str(empty)!r} holds no prompts" in bad.output
    bad_expert = runner.invoke(main, ["probe", "--expert", "mid", "--out", str(tmp_path / "r.h5")])
    assert bad_expert.exit_code == 1 and "unknown expert 'mid'; this model has: high, low" in bad_expert.output


def _files_equal(a: Path, b: Path) -> None:
    with ProbeFile(a) as left, ProbeFile(b) as right:
        assert left.done.all() and right.done.all()
        for expert in left.experts:
            assert left.layers(expert) == right.layers(expert)
            for layer in left.layers(expert):
                for stat in ("channel_absmax", "token_absmax", "samples"):
                    np.testing.assert_array_equal(left.read(expert, layer, stat), right.read(expert, layer, stat))
            for name in left.file[f"experts/{expert}/first_block"]:
                np.testing.assert_array_equal(left.first_block(expert, name), right.first_block(expert, name))


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a red ball number {i} moving left" for i in range(24)))
    command = [sys.executable, "-m", "sensq.cli", "probe", "--prompts", str(prompts), "--steps", "2", "--tokens", "8"]
    killed = tmp_path / "killed.h5"
    process = subprocess.Popen(command + ["--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if killed.exists():
            with h5py.File(killed, "r", locking=False) as f:  # the writer only rewrites data in place
                if f["prompts/done"][...].sum() >= 3:
                    break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    with ProbeFile(killed) as probe:  # valid after kill -9
        done = probe.done
        assert 3 <= done.sum() < 24
    resumed = subprocess.run(command + ["--out", str(killed), "--resume", "--json"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["prompts_skipped"] == int(done.sum())
    clean = tmp_path / "clean.h5"
    subprocess.run(command + ["--out", str(clean)], check=True, capture_output=True)
    _files_equal(killed, clean)


def test_outputs_are_the_layers_outputs_at_the_sampled_rows(tiny, tmp_path):
    """--outputs: recorded outputs equal an independent capture (a plain forward hook) bit for bit, Conv3d
    included (rows in patch order); a probe without them says how to get them."""
    run_probe(_request(tiny, tmp_path / "o.h5", n_prompts=1, config=ProbeConfig(outputs=True)))
    trajectory = Trajectory(steps=4).with_resolution(tiny.default_resolution)
    apply_trajectory(tiny.pipe, trajectory)
    captured = {"blocks.1.ffn.net.2": [], "patch_embedding": []}
    expert = tiny.pipe.transformer_2
    handles = [expert.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: captured[name].append(
        out.detach())) for name in captured]
    try:
        run(tiny.pipe, load_prompts(None, 1)[0].text, trajectory, seed=0)
    finally:
        for handle in handles:
            handle.remove()
    with ProbeFile(tmp_path / "o.h5") as probe:
        assert probe.has_outputs("low")
        for name, outs in captured.items():
            recorded = probe.read("low", name, "outputs")[0]
            rows = torch.from_numpy(probe.layer_attrs("low", name)["sample_rows"])
            assert recorded.shape[-1] == probe.layer_attrs("low", name)["out_features"]
            for k, out in enumerate(outs):
                step, branch = divmod(k, 2)
                flat = out.permute(0, 2, 3, 4, 1).reshape(-1, out.shape[1]) if out.dim() == 5 else \
                    out.reshape(-1, out.shape[-1])
                np.testing.assert_array_equal(recorded[step, branch], flat[rows].numpy())
    run_probe(_request(tiny, tmp_path / "plain.h5", n_prompts=1))
    with ProbeFile(tmp_path / "plain.h5") as probe, pytest.raises(InputError, match="probe with --outputs"):
        probe.read("low", "proj_out", "outputs")
