"""Files from someone else (issue: untrusted files and silent damage): a probe, plan, checkpoint or
generation folder can never make sensq write, read or run outside its own folder; NaN never passes
silently; an overwrite never loses the old result; two writers never share an output.

Each attack is run through the CLI as a user would meet it, and asserts: the exit code, one error line
naming the problem, and that nothing outside the folder was written (or read, where it is observable).
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
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
from sensq.errors import InputError, OutputError


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, *fragments, exit_code=1):
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _crafted_probe(workspace, tmp_path, name="crafted.h5") -> Path:
    crafted = tmp_path / name
    shutil.copy(workspace / "probe.h5", crafted)
    return crafted


# -- HDF5: external storage, external/soft links, virtual datasets ---------------------------------------


def _external_storage(path: Path, victim: Path) -> None:
    with h5py.File(path, "r+") as f:
        original = f["experts/high/samples"]
        shape, dtype = original.shape, original.dtype
        del f["experts/high/samples"]
        size = int(np.prod(shape)) * dtype.itemsize
        f.create_dataset("experts/high/samples", shape=shape, dtype=dtype, external=[(str(victim), 0, size)])
        f["prompts/done"][-1] = False  # a prompt left to write: what --resume would do


def test_probe_resume_refuses_external_storage_and_writes_nothing(workspace, tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious" * 1000)
    before = _digest(victim)
    crafted = _crafted_probe(workspace, tmp_path)
    _external_storage(crafted, victim)
    result = _invoke("probe", "--limit", "2", "--steps", "3", "--resume", "--out", crafted)
    _one_line_error(result, "external storage", "experts/high/samples", "refusing to open it")
    assert _digest(victim) == before
    result = _invoke("rank", crafted, "--out", tmp_path / "r.json")
    _one_line_error(result, "external storage")
    assert not (tmp_path / "r.json").exists()


def test_external_and_soft_links_are_refused(workspace, tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["secret"] = np.arange(10.0)
    linked = _crafted_probe(workspace, tmp_path, "linked.h5")
    with h5py.File(linked, "r+") as f:
        f["experts/high/extra"] = h5py.ExternalLink(str(other), "/secret")
    _one_line_error(_invoke("rank", linked, "--out", tmp_path / "r.json"), "external link", "experts/high/extra")
    soft = _crafted_probe(workspace, tmp_path, "soft.h5")
    with h5py.File(soft, "r+") as f:
        f["experts/high/alias"] = h5py.SoftLink("/experts/high/samples")
    _one_line_error(_invoke("rank", soft, "--out", tmp_path / "r.json"), "soft or user-defined link")
    _one_line_error(_invoke("apply-plan", workspace / "plan.json", "--probe", soft, "--calibrate", "mse", "--out",
                            tmp_path / "q"), "soft or user-defined link")
    assert not (tmp_path / "q").exists()


def test_virtual_datasets_are_refused(workspace, tmp_path):
    source = tmp_path / "source.h5"
    with h5py.File(source, "w") as f:
        f["data"] = np.zeros(4, dtype=np.float32)
    crafted = _crafted_probe(workspace, tmp_path)
    layout = h5py.VirtualLayout(shape=(4,), dtype=np.float32)
    layout[:] = h5py.VirtualSource(str(source), "data", shape=(4,))
    with h5py.File(crafted, "r+") as f:
        f.create_virtual_dataset("experts/high/virtual", layout)
    _one_line_error(_invoke("rank", crafted, "--out", tmp_path / "r.json"), "virtual dataset")


def test_damaged_probe_files_get_one_line(workspace, tmp_path):
    cut = tmp_path / "cut.h5"
    data = (workspace / "probe.h5").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    for args in (["rank", cut, "--out", tmp_path / "r.json"],
                 ["apply-plan", workspace / "plan.json", "--probe", cut, "--calibrate", "mse", "--out", tmp_path / "q"],
                 ["probe", "--limit", "2", "--steps", "3", "--resume", "--out", cut]):
        _one_line_error(_invoke(*args), str(cut), "probe again")
    garbled = tmp_path / "garbled.h5"
    raw = bytearray(data)
    raw[len(raw) // 3: len(raw) // 3 + 4096] = bytes(4096)
    garbled.write_bytes(bytes(raw))
    result = _invoke("rank", garbled, "--out", tmp_path / "r.json")
    assert result.exit_code in (0, 1)  # zeroed data may still be a readable file: then it ranks; never a traceback
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


# -- pickle ---------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_latents_never_run(workspace, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(workspace / "fp", run)
    manifest = json.loads((run / "manifest.json").read_text())
    item = manifest["items"]["0"]
    assert item["latents"].endswith(".safetensors")  # what sensq writes: no pickle
    marker = tmp_path / "pwned"
    torch.save(_Payload(str(marker)), run / "latents" / "00000.pt")
    item["latents"] = "latents/00000.pt"
    (run / "manifest.json").write_text(json.dumps(manifest))
    _one_line_error(_invoke("eval", run, "--reference", workspace / "fp"), "latents file", "is damaged")
    assert not marker.exists()


def test_checkpoint_with_a_pickle_file_is_refused(workspace, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(workspace / "ckpt", ckpt)
    (ckpt / "pipeline" / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    _one_line_error(_invoke("generate", "--model", ckpt, "--limit", "1", "--no-video", "--out", tmp_path / "g"),
                    "pickle-format file", "diffusion_pytorch_model.bin")


def test_a_lora_that_is_a_pickle_is_refused(tmp_path):
    lora = tmp_path / "lora.safetensors"
    torch.save({"x": torch.zeros(1)}, lora)
    _one_line_error(_invoke("generate", "--lora-high", lora, "--no-video", "--out", tmp_path / "g"),
                    "is not a safetensors file")
    not_lora = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(not_lora))
    _one_line_error(_invoke("generate", "--lora-low", not_lora, "--no-video", "--out", tmp_path / "g"),
                    "holds no LoRA weights")


# -- paths inside files ---------------------------------------------------------------------------------


def _tamper_manifest(ckpt: Path, change) -> None:
    path = ckpt / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("target", ["exists", "missing"])
def test_traversal_keys_in_a_manifest_are_refused_without_revealing_the_target(workspace, tmp_path, target):
    outside = tmp_path / "outside.txt"
    if target == "exists":
        outside.write_text("secret")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(workspace / "ckpt", ckpt)
    _tamper_manifest(ckpt, lambda m: m["files"].update({"../outside.txt": {"sha256": "0" * 64, "bytes": 6}}))
    line = _one_line_error(_invoke("generate", "--model", ckpt, "--no-video", "--out", tmp_path / "g"),
                           "'../outside.txt'", "points outside its folder")
    assert "missing" not in line and "corrupted" not in line


def test_expert_folders_and_unlisted_files(workspace, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(workspace / "ckpt", ckpt)
    _tamper_manifest(ckpt, lambda m: m["experts"].update({"high": "../../etc"}))
    _one_line_error(_invoke("generate", "--model", ckpt, "--no-video", "--out", tmp_path / "g"),
                    "'../../etc'", "refusing it")
    shutil.rmtree(ckpt)
    shutil.copytree(workspace / "ckpt", ckpt)
    (ckpt / "transformer" / "extra.safetensors").write_bytes(b"unverified")
    _one_line_error(_invoke("generate", "--model", ckpt, "--no-video", "--out", tmp_path / "g"),
                    "'transformer/extra.safetensors'", "does not list")


def test_generation_paths_stay_inside(workspace, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(workspace / "fp", run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["items"]["0"]["frames"] = "../../../etc/passwd"
    (run / "manifest.json").write_text(json.dumps(manifest))
    _one_line_error(_invoke("eval", run, "--reference", workspace / "fp"), "points outside its folder")


def test_model_and_loras_named_in_a_probe_are_not_followed(workspace, tmp_path):
    crafted = _crafted_probe(workspace, tmp_path)
    with h5py.File(crafted, "r+") as f:
        f.attrs["model_id"] = str(tmp_path / "somebody-elses-model")
    _one_line_error(_invoke("rank", crafted, "--out", tmp_path / "r.json"), "pass --model",
                    "does not load a model that a file names")
    with h5py.File(crafted, "r+") as f:
        f.attrs["model_id"] = "tiny"
        f.attrs["loras"] = json.dumps({"high": "/somewhere/evil.safetensors"})
    _one_line_error(_invoke("rank", crafted, "--out", tmp_path / "r.json"),
                    "pass them yourself", "--lora-high /somewhere/evil.safetensors")


# -- regex denial of service ----------------------------------------------------------------------------


def test_catastrophic_regex_is_bounded(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"schema": "sensq.plan/1", "rules": [
        {"match": "re:(.*.*.*)*X", "weight": None, "activation": None},
        {"match": "re:.*", "weight": "hif4", "activation": "hif4"}]}))
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "sensq.cli", "plan", "--validate", str(plan), "--model", "tiny"],
                               capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - started < 120
    assert completed.returncode == 1, completed.stderr
    assert completed.stderr.strip().splitlines() == [
        "Error: 1 plan rule(s) match no layer of this model: 're:(.*.*.*)*X'"]
    plan.write_text(json.dumps({"schema": "sensq.plan/1", "rules": [{"match": "re:(?=x)high:.*", "weight": None}]}))
    _one_line_error(_invoke("plan", "--validate", plan), "is not valid (RE2 syntax")


# -- NaN and Inf ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loras", ["{not json", "[1, 2]"])
def test_a_probe_whose_loras_attribute_is_not_json_is_one_line(workspace, tmp_path, loras):
    crafted = _crafted_probe(workspace, tmp_path, "loras.h5")
    with h5py.File(crafted, "r+") as f:
        f.attrs["loras"] = loras
    _one_line_error(_invoke("rank", crafted, "--metric", "mse", "--out", tmp_path / "r.json"), "is damaged",
                    "loras")


def test_nan_probe_is_refused_by_rank_and_calibration(workspace, tmp_path):
    crafted = _crafted_probe(workspace, tmp_path, "nan.h5")
    with h5py.File(crafted, "r+") as f:
        f["experts/low/samples"][0, 0, 0, 5] = np.nan
        f["experts/high/first_block/hidden_states"][0, 0, 0, 0, 0] = np.inf
    _one_line_error(_invoke("rank", crafted, "--metric", "mse", "--out", tmp_path / "r.json"), "NaN or Inf",
                    "the samples of low:")
    assert not (tmp_path / "r.json").exists()
    _one_line_error(_invoke("apply-plan", workspace / "plan.json", "--probe", crafted, "--calibrate", "mse", "--out",
                            tmp_path / "q"), "NaN or Inf")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("option", [["--guidance", "nan"], ["--guidance-2", "inf"], ["--shift", "nan"],
                                    ["--scheduler", "euler", "--steps", "2", "--sigmas", "1,nan"]])
def test_non_finite_trajectory_options_are_refused(option, tmp_path):
    _one_line_error(_invoke("probe", *option, "--out", tmp_path / "p.h5"), "must be")
    assert not list(tmp_path.iterdir())


def test_probe_refuses_non_finite_activations(tmp_path, monkeypatch):
    from sensq.probes import capture

    real = capture.ProbeSession.take_step

    def poisoned(self, step):
        data = real(self, step)
        data.packed["samples"][..., 0] = np.nan
        return data

    monkeypatch.setattr(capture.ProbeSession, "take_step", poisoned)
    _one_line_error(_invoke("probe", "--limit", "1", "--steps", "2", "--out", tmp_path / "p.h5"),
                    "produced NaN or Inf activations")
    assert not (tmp_path / "p.h5").exists()


# -- overwrites, interruptions, concurrency -------------------------------------------------------------


def test_probe_overwrite_keeps_the_old_file_until_the_new_one_is_complete(workspace, tmp_path, monkeypatch):
    old = tmp_path / "p.h5"
    shutil.copy(workspace / "probe.h5", old)
    before = _digest(old)
    from sensq.probes import recorder

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(recorder, "run", interrupted)
    result = _invoke("probe", "--limit", "1", "--steps", "2", "--overwrite", "--out", old)
    _one_line_error(result, "interrupted", "run the same command again", exit_code=130)
    assert _digest(old) == before


def test_checkpoint_replacement_keeps_the_old_one_on_failure(workspace, tmp_path, monkeypatch):
    from sensq.loading import load_model
    from sensq.plan import Plan
    from sensq.quant.apply import apply_plan
    from sensq.quant.checkpoint import read_manifest, save_quantized

    ckpt = tmp_path / "ckpt"
    shutil.copytree(workspace / "ckpt", ckpt)
    before = {p.name: _digest(p) for p in ckpt.rglob("*") if p.is_file()}
    model = load_model("tiny", torch.device("cpu"), torch.float32)
    plan = Plan.load(workspace / "plan.json")
    apply_plan(model, plan)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(model.pipe), "save_pretrained", full)
    with pytest.raises(OutputError, match="disk full while writing .*ckpt"):
        save_quantized(model, ckpt, plan=plan, calibration={})
    assert {p.name: _digest(p) for p in ckpt.rglob("*") if p.is_file()} == before
    read_manifest(ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left behind


def test_apply_plan_never_deletes_a_foreign_folder(workspace, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    _one_line_error(_invoke("apply-plan", workspace / "plan.json", "--out", foreign),
                    "is not a checkpoint sensq wrote", "choose another --out")
    assert (foreign / "thesis.tex").read_text() == "years of work"
    for forbidden in (".", "/"):
        _one_line_error(_invoke("apply-plan", workspace / "plan.json", "--out", forbidden),
                        "current, home or root folder")


def _lock_holder(out: Path) -> subprocess.Popen:
    """Another process that holds ``out``'s sensq lock until killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom sensq.store.files import output_lock\n"
         f"with output_lock({str(out)!r}):\n    print('locked', flush=True)\n    time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_stale_lock(workspace, tmp_path):
    out = tmp_path / "runs"
    holder = _lock_holder(out)
    try:
        result = _invoke("generate", "--limit", "1", "--steps", "2", "--no-video", "--out", out)
        _one_line_error(result, f"another sensq command (pid {holder.pid}) is writing")
        assert not out.exists()
    finally:
        holder.kill()  # kill -9: the kernel releases the lock
        holder.wait()
    result = _invoke("generate", "--limit", "1", "--steps", "2", "--no-video", "--out", out)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / ".runs.lock").exists()


def test_two_generates_with_different_settings_never_share_a_folder(tmp_path):
    out = tmp_path / "g"
    assert _invoke("generate", "--limit", "1", "--steps", "2", "--no-video", "--out", out).exit_code == 0
    _one_line_error(_invoke("generate", "--limit", "1", "--steps", "3", "--no-video", "--out", out),
                    "holds generations of another configuration")


def test_atomic_writes_use_unique_names_and_say_one_line_on_failure(tmp_path, monkeypatch):
    from sensq.store import files

    target = tmp_path / "x.json"
    files.write_json(target, {"a": 1})
    files.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2} and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]

    real_fdopen = files.os.fdopen

    class FullDisk:
        def __init__(self, fd, mode):
            self.file = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fdopen", FullDisk)
    with pytest.raises(OutputError, match="disk full while writing .*x.json.*MB free"):
        files.write_json(target, {"a": 3})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"a": 2} and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_disk_full_in_a_command_is_one_line(workspace, tmp_path, monkeypatch):
    from sensq.store.probe_writer import ProbeWriter

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "p.h5"))

    monkeypatch.setattr(ProbeWriter, "write_step", full)
    _one_line_error(_invoke("probe", "--limit", "1", "--steps", "2", "--out", tmp_path / "p.h5"), "disk full")


@pytest.fixture
def small_disk(tmp_path):
    """A 400 kB tmpfs (needs root and mount rights: skipped elsewhere), for real disk-full runs."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_a_really_full_disk_is_one_line_and_resumes(workspace, small_disk):
    runs = small_disk / "g"
    filler = small_disk / "filler"
    filler.write_bytes(bytes(250_000))
    full = _invoke("generate", "--limit", "4", "--steps", "2", "--out", runs)
    line = _one_line_error(full, "disk full while writing", "MB free", "run the same command again")
    assert str(small_disk) in line
    done = len(json.loads((runs / "manifest.json").read_text())["items"])
    assert done < 4
    probe = _invoke("probe", "--limit", "2", "--steps", "3", "--yes", "--out", small_disk / "p.h5")
    _one_line_error(probe, "disk full while writing", "p.h5'", "MB free")
    assert not (small_disk / "p.h5").exists() and not (small_disk / "p.h5.tmp").exists()
    ckpt = _invoke("apply-plan", workspace / "plan.json", "--out", small_disk / "q")
    _one_line_error(ckpt, "disk full while writing", "/q'")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "g"]  # no half checkpoint, no temp
    filler.unlink()
    again = _invoke("generate", "--limit", "4", "--steps", "2", "--out", runs, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["skipped"] == done


def test_outputs_get_the_usual_permissions(tmp_path):
    from sensq.store.files import write_json

    write_json(tmp_path / "x.json", {})
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~_current_umask()


def _current_umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_probe_estimates_its_size_before_allocating(tmp_path, monkeypatch):
    from sensq.store import files

    monkeypatch.setattr(files, "_free_bytes", lambda path: 1000)
    _one_line_error(_invoke("probe", "--limit", "1", "--steps", "2", "--out", tmp_path / "p.h5"),
                    "needs about", "pass --yes")
    assert not (tmp_path / "p.h5").exists()
    assert _invoke("probe", "--limit", "1", "--steps", "2", "--yes", "--out", tmp_path / "p.h5").exit_code == 0


def test_inside_refuses_links_out(tmp_path):
    from sensq.store.files import inside

    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "link").symlink_to(tmp_path)
    with pytest.raises(InputError, match="leads outside its folder"):
        inside(tmp_path / "folder", "link/secret", "file")
    assert inside(tmp_path / "folder", "a/b.npy", "file") == tmp_path / "folder" / "a" / "b.npy"


@pytest.mark.parametrize("command", [
    lambda ws, out: ["ablate", ws / "ranking.json", "--limit", "1", "--seeds", "1", "--top-k", "1", "--budget", "",
                     "--out", out],
    lambda ws, out: ["plan", ws / "ranking.json", "--top-k", "1", "--out", out],
    lambda ws, out: ["report", ws / "ranking.json", "--out", out],
], ids=["ablate", "plan", "report"])
def test_ablate_plan_and_report_hold_the_lock_every_writer_holds(command, workspace, tmp_path):
    """While another sensq command holds --out's lock, the command is refused at once (one line naming the
    holder) and writes nothing; once the holder is gone it runs."""
    out = tmp_path / "out"
    holder = _lock_holder(out)
    try:
        _one_line_error(_invoke(*command(workspace, out)), f"another sensq command (pid {holder.pid}) is writing")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    result = _invoke(*command(workspace, out))
    assert result.exit_code == 0, result.output
    assert out.exists()
