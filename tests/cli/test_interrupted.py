"""Interrupted commands (kill -9 and Ctrl-C) leave nothing that a later run mistakes for complete, keep the
old output, leave no stale lock, and the same command run again gives exactly what an uninterrupted run
gives. (The probe's own kill -9 test is in tests/probes.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from interrupts import popen_interruptible

SENSQ = [sys.executable, "-m", "sensq.cli"]


def _wait_for(condition, process, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not condition():
        time.sleep(0.02)
    assert process.poll() is None, "the command finished before it could be interrupted"
    assert condition(), "the command did not reach the point to interrupt"


def _interrupt(process, how: str) -> None:
    assert process.poll() is None, "the command finished before it could be interrupted"
    os.kill(process.pid, signal.SIGKILL if how == "kill -9" else signal.SIGINT)
    process.wait(timeout=120)


@pytest.fixture(scope="module")
def uncut(tmp_path_factory):
    """``uncut(args)``: the output folder or file of ``sensq ARGS --out ...`` run once, uninterrupted; shared by
    every way of interrupting the same command (its result does not depend on them)."""
    done: dict[tuple, Path] = {}

    def run(args: list[str], name: str) -> Path:
        if tuple(args) not in done:
            out = tmp_path_factory.mktemp("uncut") / name
            result = subprocess.run(SENSQ + args + ["--out", str(out)], capture_output=True, text=True)
            assert result.returncode == 0, result.stderr[-2000:]
            done[tuple(args)] = out
        return done[tuple(args)]

    return run


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("how", ["kill -9", "Ctrl-C"])
def test_generate_resumes_to_the_uninterrupted_result(tmp_path_factory, tmp_path, uncut, how):
    prompts = tmp_path_factory.getbasetemp() / "twelve-prompts.txt"
    prompts.write_text("\n".join(f"a small bird number {i} flying" for i in range(12)))
    args = ["generate", "--prompts", str(prompts), "--steps", "2", "--no-video"]
    whole = uncut(args, "whole")
    out = tmp_path / "cut"
    process = popen_interruptible(SENSQ + args + ["--out", str(out)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)

    def two_done() -> bool:
        try:
            return len(json.loads((out / "manifest.json").read_text())["items"]) >= 2
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    _wait_for(two_done, process)
    _interrupt(process, how)
    if how == "Ctrl-C":
        assert process.returncode == 130
        last = process.stderr.read().strip().splitlines()[-1]
        assert last.startswith("Error: interrupted; what was complete is kept")
    items = json.loads((out / "manifest.json").read_text())["items"]  # valid JSON after either
    assert 2 <= len(items) < 12 and all((out / item["frames"]).is_file() for item in items.values())
    stamps = {k: (out / item["frames"]).stat().st_mtime_ns for k, item in items.items()}
    rerun = subprocess.run(SENSQ + args + ["--out", str(out), "--json"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout)
    assert summary["skipped"] == len(items) and summary["generated"] == 12 - len(items)
    assert all((out / item["frames"]).stat().st_mtime_ns == stamps[k] for k, item in items.items())  # not redone
    cut, complete = _digests(out), _digests(whole)
    data = {k: v for k, v in complete.items() if k.startswith(("frames/", "latents/"))}
    assert {k: cut[k] for k in data} == data  # every frame and latent equal to the uninterrupted run's
    assert not list(tmp_path.glob(".cut.lock"))


@pytest.mark.parametrize("how", ["kill -9", "Ctrl-C"])
def test_rank_keeps_the_old_ranking_and_reruns_to_the_same(workspace, tmp_path, uncut, how):
    out = tmp_path / "ranking.json"
    args = ["rank", str(workspace / "probe.h5"), "--metric", "e2e", "--limit", "1"]
    whole = uncut(args, "whole.json")
    shutil.copy(workspace / "ranking.json", out)  # an older ranking at --out: kept until the new one is complete
    before = out.read_bytes()
    process = popen_interruptible(SENSQ + args + ["--out", str(out)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (tmp_path / ".ranking.json.lock").exists(), process)
    time.sleep(0.5)  # into the work (the lock is taken before the model loads)
    _interrupt(process, how)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".ranking.json.lock")) == [
        "ranking.json"]  # no partial file
    if how == "Ctrl-C":
        return  # the state kill -9 leaves too (old output, nothing partial): its case reruns from it
    rerun = subprocess.run(SENSQ + args + ["--out", str(out)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(out.read_text())["experts"] == json.loads(whole.read_text())["experts"]


@pytest.mark.parametrize("how", ["kill -9", "Ctrl-C"])
def test_apply_plan_keeps_the_old_checkpoint_and_reruns_to_the_same(workspace, tmp_path, uncut, how):
    args = ["apply-plan", str(workspace / "plan.json"), "--probe", str(workspace / "probe.h5"), "--calibrate", "mse"]
    whole = uncut(args, "whole")
    out = tmp_path / "q"
    shutil.copytree(workspace / "ckpt", out)  # an older checkpoint at --out
    before = _digests(out)
    process = popen_interruptible(SENSQ + args + ["--out", str(out)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (tmp_path / ".q.lock").exists(), process)
    time.sleep(0.5)
    _interrupt(process, how)
    assert _digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".q.lock")) == ["q"]  # nothing partial
    if how == "Ctrl-C":
        return  # the state kill -9 leaves too (old checkpoint, nothing partial): its case reruns from it
    rerun = subprocess.run(SENSQ + args + ["--out", str(out)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    complete, cut = _digests(whole), _digests(out)
    weights = [k for k in complete if k.endswith(".safetensors") and k.startswith("transformer")]
    assert weights and {k: cut[k] for k in weights} == {k: complete[k] for k in weights}
    assert json.loads((out / "manifest.json").read_text())["layers"] == \
        json.loads((whole / "manifest.json").read_text())["layers"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary folder left behind


def test_the_simulated_ctrl_c_reaches_a_child_of_a_background_job():
    """Started with SIGINT ignored (as a shell starts a background job), the helper's child still has Python's
    own SIGINT handler, and a plain Popen child does not (the assumption this guards against)."""
    probe = [sys.executable, "-c",
             "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ours = popen_interruptible(probe, stdout=subprocess.PIPE, text=True).communicate()[0].strip()
        plain = subprocess.run(probe, capture_output=True, text=True).stdout.strip()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (ours, plain) == ("True", "False")


_PAUSED_SAVE = """
import sys, time
import sensq.quant.checkpoint.write as checkpoint
point = sys.argv[1]
original = getattr(checkpoint, point)

def paused(*args, **kwargs):
    result = original(*args, **kwargs)
    print("paused", flush=True)
    time.sleep(120)
    return result

setattr(checkpoint, point, paused)
from sensq.cli import main
main(sys.argv[2:], prog_name="sensq")
"""


@pytest.mark.parametrize("point", ["_write_expert", "_write_checkpoint"],
                         ids=["after the first expert is written", "after everything is written, before the move"])
def test_apply_plan_killed_while_saving_keeps_the_old_checkpoint_and_reruns_to_the_same(workspace, tmp_path, uncut,
                                                                                        point):
    """kill -9 in the save phase (the earlier test kills during calibration): the old checkpoint at --out is
    untouched, the half-written temporary folder is the only thing left, and the rerun removes it and writes
    what an uninterrupted run writes."""
    args = ["apply-plan", str(workspace / "plan.json"), "--probe", str(workspace / "probe.h5"), "--calibrate", "mse"]
    whole = uncut(args, "whole")
    out = tmp_path / "q"
    shutil.copytree(workspace / "ckpt", out)
    before = _digests(out)
    process = subprocess.Popen([sys.executable, "-c", _PAUSED_SAVE, point, *args, "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "paused", process.stderr.read()[-2000:]
    temporary = [p for p in tmp_path.iterdir() if p.name.startswith(".q.") and p.name.endswith(".tmp")]
    assert len(temporary) == 1 and any(temporary[0].rglob("*.safetensors"))  # caught in the middle of the save
    _interrupt(process, "kill -9")
    assert _digests(out) == before
    rerun = subprocess.run(SENSQ + args + ["--out", str(out)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    complete, cut = _digests(whole), _digests(out)
    weights = [k for k in complete if k.endswith(".safetensors") and k.startswith("transformer")]
    assert weights and {k: cut[k] for k in weights} == {k: complete[k] for k in weights}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # the stale temporary folder is gone
