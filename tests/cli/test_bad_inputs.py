"""Bad inputs through the CLI, as a new user meets them: every one ends in one clear error line that names
the bad value, with the documented exit code (1 failure, 2 usage), and no file that existed before the
command changed (the shared workspace and the case's own folder are hashed before and after).

Each case builds what it needs from copies of a real run (the ``workspace`` fixture: probe, ranking, plan,
packed checkpoint, generation folder of the embedded tiny model).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from sensq.cli import main


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path, Path], list]
    """(workspace, case folder) -> the command's arguments; may write bad files into the case folder."""
    fragments: tuple[str, ...]
    exit_code: int = 1


def _json(folder: Path, name: str, data) -> Path:
    path = folder / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def _bytes(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def _ranking(ws: Path, folder: Path, change) -> Path:
    data = json.loads((ws / "ranking.json").read_text())
    change(data)
    return _json(folder, "ranking.json", data)


def _plan(ws: Path, folder: Path, change) -> Path:
    data = json.loads((ws / "plan.json").read_text())
    change(data)
    return _json(folder, "plan.json", data)


def _layer(data) -> dict:
    return data["experts"]["high"][0]


def _checkpoint(ws: Path, folder: Path, change_manifest=None, change_weights=None) -> Path:
    """A copy of the workspace checkpoint, tampered with and (for the weights) re-hashed so that the SHA-256
    check passes: what is left to catch is that the content does not fit the config."""
    ckpt = folder / "ckpt"
    shutil.copytree(ws / "ckpt", ckpt)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    if change_weights is not None:
        weights = ckpt / "transformer" / "weights.safetensors"
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(weights))
        change_weights(tensors)
        save_file(tensors, str(weights), metadata=metadata)
        manifest["files"]["transformer/weights.safetensors"] = {
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "bytes": weights.stat().st_size}
    if change_manifest is not None:
        result = change_manifest(manifest)  # a list or bytes replaces the manifest; anything else edited it
        manifest = result if isinstance(result, (list, bytes)) else manifest
    (ckpt / "manifest.json").write_bytes(manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode())
    return ckpt


def _generation(ws: Path, folder: Path, change=None, name: str = "run") -> Path:
    run = folder / name
    shutil.copytree(ws / "fp", run)
    if change is not None:
        manifest = json.loads((run / "manifest.json").read_text())
        change(manifest, run)
        (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def _probe(ws: Path, folder: Path, change) -> Path:
    path = folder / "probe.h5"
    shutil.copy(ws / "probe.h5", path)
    change(path)
    return path


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _attrs(**changes):
    def change(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            for key, value in changes.items():
                if value is None:
                    del f.attrs[key]
                else:
                    f.attrs[key] = value
    return change


def _foreign_folder(folder: Path) -> Path:
    mine = folder / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not sensq's")
    return mine


def _foreign_file(folder: Path, name: str = "notes.json") -> Path:
    path = folder / name
    path.write_text('{"mine": true}')
    return path


def _blocker(folder: Path) -> Path:
    path = folder / "a-file"
    path.write_text("x")
    return path


def _export_over_a_foreign_file(ws: Path, folder: Path) -> list:
    _foreign_file(folder, "p.torchao.transformer.json")
    return ["plan", ws / "ranking.json", "--top-k", "1", "--export", "torchao", "--out", folder / "p.json"]


def _tiered(ws: Path, folder: Path, change=None) -> Path:
    """The workspace ranking with a second format (fp8_e4m3, a tenth of hif4's predicted error) for --tiers."""
    def add_tier(data):
        _add_tier(data)
        if change is not None:
            change(data)
    return _ranking(ws, folder, add_tier)


def _as_e2e(change=None):
    """The workspace ranking relabelled as a per-layer e2e ranking of the same probe (a truth for --validate)."""
    def edit(data):
        data["metric"] = "e2e"
        if change is not None:
            change(data)
    return edit


def _every_value(data, value):
    for layers in data["experts"].values():
        for layer in layers:
            layer["value"] = {fmt: value for fmt in layer["value"]}


def _block_ranking(ws: Path, folder: Path, change=None) -> Path:
    """A real per-block e2e ranking of the workspace probe (1 prompt), optionally edited."""
    path = folder / "blocks.json"
    result = CliRunner().invoke(main, ["rank", str(ws / "probe.h5"), "--metric", "e2e", "--granularity", "block",
                                       "--limit", "1", "--out", str(path)])
    assert result.exit_code == 0, result.output
    if change is not None:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return path


def _add_tier(data):
    data["formats"].append("fp8_e4m3")
    for layers in data["experts"].values():
        for layer in layers:
            layer["value"]["fp8_e4m3"] = layer["value"]["hif4"] / 10
            layer["rank"]["fp8_e4m3"] = layer["rank"]["hif4"]


def _fake_checkpoint(ws: Path, folder: Path) -> Path:
    result = CliRunner().invoke(main, ["apply-plan", str(ws / "plan.json"), "--fake", "--out", str(folder / "fake")])
    assert result.exit_code == 0, result.output
    return folder / "fake"


def _nonfinite_weight(value):
    def change(tensors):
        key = next(k for k, t in tensors.items() if t.is_floating_point())
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
    return change


def _drop_layer_table(expert):
    def change(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            del f[f"experts/{expert}/layer_table"]
    return change


def _wan21_probe(folder: Path) -> Path:
    path = folder / "wan21.h5"
    result = CliRunner().invoke(main, ["probe", "--model", "tiny-wan21", "--limit", "1", "--steps", "2", "--out",
                                       str(path)])
    assert result.exit_code == 0, result.output
    return path


def _set(container, key, value):
    container[key] = value


GEN = ["generate", "--limit", "1", "--steps", "2", "--no-video"]
DEEP = b"[" * 200000 + b"]" * 200000  # deeper than Python's recursion limit: json.loads raises RecursionError


def _nested_generation(ws: Path, folder: Path) -> Path:
    run = _generation(ws, folder, name="nested")
    (run / "manifest.json").write_bytes(b'{"schema": "sensq.generation/1", "items": ' + DEEP + b"}")
    return run

CASES = [
    # -- rankings of the right kind but the wrong shape (plan, report, ablate read them) -------------------
    Case("ranking-without-experts", lambda ws, d: ["plan", _ranking(ws, d, lambda r: r.pop("experts")),
                                                   "--budget", "5%", "--out", d / "p.json"],
         ("is not a valid ranking", "lacks the field 'experts'")),
    Case("ranking-experts-list", lambda ws, d: ["plan", _ranking(ws, d, lambda r: _set(r, "experts", [])),
                                                "--budget", "5%", "--out", d / "p.json"],
         ("the document.experts must be an object, got []",)),
    Case("ranking-extra-layer-field", lambda ws, d: ["plan", _ranking(ws, d, lambda r: _set(_layer(r), "bogus", 1)),
                                                     "--top-k", "1", "--out", d / "p.json"],
         ("has an unknown field 'bogus'",)),
    Case("ranking-missing-layer-field", lambda ws, d: ["plan", _ranking(ws, d, lambda r: _layer(r).pop("params")),
                                                       "--top-k", "1", "--out", d / "p.json"],
         ("experts.high[0] lacks the field 'params'",)),
    Case("ranking-string-for-number", lambda ws, d: ["plan", _ranking(ws, d, lambda r: _set(_layer(r), "params",
                                                                                           "2080")),
                                                     "--top-k", "1", "--out", d / "p.json"],
         ("params must be an integer, got '2080'",)),
    Case("ranking-no-formats", lambda ws, d: ["plan", _ranking(ws, d, lambda r: _set(r, "formats", [])),
                                              "--top-k", "1", "--out", d / "p.json"],
         ("names no format",)),
    Case("ranking-layer-without-rank", lambda ws, d: ["plan", _ranking(ws, d, lambda r: _set(_layer(r), "rank", {})),
                                                      "--top-k", "1", "--out", d / "p.json"],
         ("high:patch_embedding has no rank for 'hif4'",)),
    Case("ranking-not-utf8", lambda ws, d: ["report", _bytes(d, "r.json", b"\xff\xfe{"), "--out", d / "rep"],
         ("not UTF-8",)),
    Case("ranking-bad-json", lambda ws, d: ["report", _json(d, "r.json", "{oops"), "--out", d / "rep"],
         ("is not valid JSON",)),
    Case("ranking-a-list", lambda ws, d: ["ablate", _json(d, "r.json", []), "--out", d / "abl"],
         ("has schema 'list'; expected 'sensq.ranking/1'",)),
    Case("ranking-value-string", lambda ws, d: ["report", _ranking(ws, d, lambda r: _set(_layer(r)["value"], "hif4",
                                                                                         "big")),
                                                "--out", d / "rep"],
         ("value.hif4 must be a number, got 'big'",)),
    Case("ranking-missing", lambda ws, d: ["plan", d / "nowhere.json", "--budget", "5%"],
         ("ranking file not found", "nowhere.json")),
    Case("ranking-is-a-plan", lambda ws, d: ["plan", ws / "plan.json", "--budget", "5%", "--out", d / "p.json"],
         ("has schema 'sensq.plan/1'; expected 'sensq.ranking/1'",)),
    # -- plans ------------------------------------------------------------------------------------------
    Case("plan-rules-not-list", lambda ws, d: ["apply-plan", _plan(ws, d, lambda p: _set(p, "rules", {"a": 1})),
                                               "--out", d / "q"],
         ("the document.rules must be a list",)),
    Case("plan-model-not-object", lambda ws, d: ["apply-plan", _plan(ws, d, lambda p: _set(p, "model", "tiny")),
                                                 "--out", d / "q"],
         ("the document.model must be an object, got 'tiny'",)),
    Case("plan-rule-without-match", lambda ws, d: ["plan", "--validate", _plan(ws, d, lambda p: p["rules"][0].pop(
        "match"))], ("rules[0] lacks the field 'match'",)),
    Case("plan-rule-match-number", lambda ws, d: ["plan", "--validate", _plan(ws, d, lambda p: _set(
        p["rules"][0], "match", 7))], ("rules[0].match must be a string, got 7",)),
    Case("plan-unknown-format", lambda ws, d: ["apply-plan", _plan(ws, d, lambda p: _set(p["rules"][-1], "weight",
                                                                                         "fp3")),
                                               "--out", d / "q"], ("'fp3'",)),
    Case("plan-unknown-calibration", lambda ws, d: ["apply-plan", _plan(ws, d, lambda p: _set(
        p["rules"][-1], "calibration", "smooth")), "--out", d / "q"], ("unknown calibration 'smooth'",)),
    Case("plan-steps-not-a-range", lambda ws, d: ["apply-plan", _plan(ws, d, lambda p: _set(
        p["rules"][-1], "steps", [0, 1, 2])), "--out", d / "q"], ("'steps' must be [low, high]", "[0, 1, 2]")),
    Case("plan-sigma-reversed", lambda ws, d: ["apply-plan", _plan(ws, d, lambda p: _set(
        p["rules"][-1], "sigma", [0.9, 0.1])), "--out", d / "q"], ("'sigma' must be [low, high]",)),
    Case("plan-steps-and-sigma", lambda ws, d: ["apply-plan", _plan(ws, d, lambda p: p["rules"][-1].update(
        steps=[0, 1], sigma=[0.5, 1.0])), "--out", d / "q"], ("both 'steps' and 'sigma'",)),
    Case("plan-gptq-without-probe", lambda ws, d: ["apply-plan", _plan(ws, d, lambda p: _set(
        p["rules"][-1], "calibration", "gptq")), "--out", d / "q"], ("'calibration' rules need --probe",)),
    Case("plan-no-rules", lambda ws, d: ["plan", "--validate", _plan(ws, d, lambda p: _set(p, "rules", []))],
         ("has no rules",)),
    Case("plan-layer-model-lacks", lambda ws, d: ["generate", "--plan", _plan(ws, d, lambda p: p["rules"].insert(
        0, {"match": "high:blocks.9.attn1.to_q", "weight": None, "activation": None})), *GEN[1:], "--out", d / "g"],
         ("match no layer of this model: 'high:blocks.9.attn1.to_q'",)),
    Case("plan-bad-regex", lambda ws, d: ["plan", "--validate", _plan(ws, d, lambda p: p["rules"].insert(
        0, {"match": "re:high:(blocks", "weight": None}))], ("regex 'high:(blocks' is not valid",)),
    Case("plan-is-a-ranking", lambda ws, d: ["apply-plan", ws / "ranking.json", "--out", d / "q"],
         ("has schema 'sensq.ranking/1'; expected 'sensq.plan/1'",)),
    Case("plan-missing", lambda ws, d: ["apply-plan", d / "gone.json", "--out", d / "q"],
         ("plan file not found", "gone.json")),
    Case("plan-weight-number", lambda ws, d: ["plan", "--validate", _plan(ws, d, lambda p: _set(
        p["rules"][0], "weight", 4))], ("rules[0].weight must be a string or null, got 4",)),
    # -- checkpoint manifests and content -----------------------------------------------------------------
    Case("manifest-a-list", lambda ws, d: [*GEN, "--model", _checkpoint(ws, d, lambda m: []), "--out", d / "g"],
         ("is not a checkpoint manifest (a JSON list, not an object)",)),
    Case("manifest-without-files", lambda ws, d: [*GEN, "--model", _checkpoint(ws, d, lambda m: m.pop("files")),
                                                  "--out", d / "g"],
         ("lacks the field 'files'",)),
    Case("manifest-not-utf8", lambda ws, d: [*GEN, "--model", _checkpoint(ws, d, lambda m: b"\xff\xfe"),
                                             "--out", d / "g"],
         ("not UTF-8",)),
    Case("manifest-nested-deeply", lambda ws, d: [*GEN, "--model", _checkpoint(
        ws, d, lambda m: b'{"schema": "sensq.checkpoint/1", "phases": ' + b"[" * 200000 + b"]" * 200000 + b"}"),
        "--out", d / "g"], ("nested too deeply",)),
    Case("ablate-unknown-set-kind", lambda ws, d: ["ablate", ws / "ranking.json", "--sets", "none,entrance-ish",
                                                   "--out", d / "a"],
         ("unknown set kind 'entrance-ish'", "known: none, entrance"), 2),
    Case("plan-nested-deeply", lambda ws, d: ["plan", "--validate", _bytes(
        d, "plan.json", b'{"schema": "sensq.plan/1", "rules": ' + DEEP + b"}")], ("nested too deeply",)),
    Case("ranking-nested-deeply", lambda ws, d: ["plan", _bytes(
        d, "ranking.json", b'{"schema": "sensq.ranking/1", "experts": ' + DEEP + b"}"), "--budget", "5%", "--out",
        d / "p.json"], ("nested too deeply",)),
    Case("generation-manifest-nested-deeply", lambda ws, d: ["eval", _generation(ws, d, lambda m, run: None),
                                                              "--reference", _nested_generation(ws, d)],
         ("nested too deeply",)),
    Case("manifest-bytes-string", lambda ws, d: [*GEN, "--model", _checkpoint(
        ws, d, lambda m: _set(m["files"]["transformer/config.json"], "bytes", "12")),
        "--out", d / "g"], ("bytes must be an integer, got '12'",)),
    Case("checkpoint-tensor-other-shape", lambda ws, d: [*GEN, "--model", _checkpoint(
        ws, d, change_weights=lambda t: _set(t, "scale_shift_table", torch.zeros(1, 2, 31))), "--out", d / "g"],
        ("holds transformer.scale_shift_table as [1, 2, 31] but its config needs [1, 2, 32]",)),
    Case("checkpoint-tensor-dropped", lambda ws, d: [*GEN, "--model", _checkpoint(
        ws, d, change_weights=lambda t: t.pop("proj_out.bias")), "--out", d / "g"],
        ("does not fit its config: missing ['proj_out.bias']",)),
    Case("checkpoint-layer-model-lacks", lambda ws, d: [*GEN, "--model", _checkpoint(
        ws, d, lambda m: _set(m["layers"], "high:blocks.9.ffn.proj", {"weight": "hif4", "activation": "hif4",
                                                                      "weight_clip": 1.0, "act_clip": 1.0})),
        "--out", d / "g"], ("lists layer 'high:blocks.9.ffn.proj', which its config does not have",)),
    Case("checkpoint-corrupted", lambda ws, d: [*GEN, "--model", _checkpoint(
        ws, d, lambda m: _set(m["files"]["transformer/config.json"], "sha256", "0" * 64)), "--out", d / "g"],
        ("is corrupted or truncated (SHA-256 mismatch)",)),
    Case("checkpoint-newer", lambda ws, d: [*GEN, "--model", _checkpoint(
        ws, d, lambda m: _set(m, "version", 9)), "--out", d / "g"], ("was written by a newer sensq",)),
    # -- probe files ------------------------------------------------------------------------------------
    Case("probe-cut-rank", lambda ws, d: ["rank", _probe(ws, d, _cut), "--out", d / "r.json"],
         ("is not an HDF5 file, or is damaged", "probe again")),
    Case("probe-cut-apply", lambda ws, d: ["apply-plan", ws / "plan.json", "--probe", _probe(ws, d, _cut),
                                           "--calibrate", "mse", "--out", d / "q"],
         ("is not an HDF5 file, or is damaged",)),
    Case("probe-cut-resume", lambda ws, d: ["probe", "--limit", "2", "--steps", "3", "--resume", "--out",
                                            _probe(ws, d, _cut)], ("is damaged", "--resume")),
    Case("probe-text-file", lambda ws, d: ["rank", _json(d, "p.h5", "hello"), "--out", d / "r.json"],
         ("is not an HDF5 file",)),
    Case("probe-missing", lambda ws, d: ["rank", d / "none.h5", "--out", d / "r.json"],
         ("probe file not found", "none.h5")),
    Case("probe-other-schema", lambda ws, d: ["rank", _probe(ws, d, _attrs(schema="other/1")), "--out",
                                              d / "r.json"], ("has schema 'other/1'; expected 'sensq.probe/1'",)),
    Case("probe-lacks-attr", lambda ws, d: ["rank", _probe(ws, d, _attrs(experts=None)), "--out", d / "r.json"],
         ("is damaged: it lacks 'experts'",)),
    Case("probe-bad-attr-json", lambda ws, d: ["rank", _probe(ws, d, _attrs(experts="[high")), "--out", d / "r.json"],
         ("is damaged (reading the 'experts' attribute failed",)),
    # -- unwritable or foreign outputs ------------------------------------------------------------------
    Case("rank-out-parent-is-file", lambda ws, d: ["rank", ws / "probe.h5", "--out", _blocker(d) / "r.json"],
         ("the folder", "a-file' is a file")),
    Case("rank-out-is-folder", lambda ws, d: ["rank", ws / "probe.h5", "--out", d],
         ("Invalid value for '--out'", "is a directory"), 2),
    Case("rank-out-foreign-file", lambda ws, d: ["rank", ws / "probe.h5", "--out", _foreign_file(d)],
         ("notes.json' exists and is not a ranking file sensq wrote",)),
    Case("plan-out-parent-missing", lambda ws, d: ["plan", ws / "ranking.json", "--top-k", "1", "--out",
                                                   d / "no" / "p.json"], ("/no' does not exist",)),
    Case("plan-out-foreign-file", lambda ws, d: ["plan", ws / "ranking.json", "--top-k", "1", "--out",
                                                 _foreign_file(d)], ("is not a plan file sensq wrote",)),
    Case("report-out-is-file", lambda ws, d: ["report", ws / "ranking.json", "--out", _blocker(d)],
         ("Invalid value for '--out'", "a-file' is a file"), 2),
    Case("report-out-foreign-folder", lambda ws, d: ["report", ws / "ranking.json", "--out", _foreign_folder(d)],
         ("exists and is not a report folder sensq wrote",)),
    Case("prompts-out-parent-missing", lambda ws, d: ["prompts", _json(d, "src.txt", "a red circle\n"), "--out",
                                                      d / "no" / "p.json"], ("/no' does not exist",)),
    Case("prompts-out-foreign-file", lambda ws, d: ["prompts", _json(d, "src.txt", "a red circle\n"), "--out",
                                                    _foreign_file(d)], ("is not a prompt file sensq wrote",)),
    Case("apply-plan-out-is-file", lambda ws, d: ["apply-plan", ws / "plan.json", "--out", _blocker(d)],
         ("Invalid value for '--out'", "a-file' is a file"), 2),
    Case("apply-plan-out-below-a-file", lambda ws, d: ["apply-plan", ws / "plan.json", "--out", _blocker(d) / "q"],
         ("a-file' is a file",)),
    Case("apply-plan-out-foreign", lambda ws, d: ["apply-plan", ws / "plan.json", "--out", _foreign_folder(d)],
         ("is not a checkpoint sensq wrote",)),
    Case("apply-plan-out-dot", lambda ws, d: ["apply-plan", ws / "plan.json", "--out", "."],
         ("'.' is the current, home or root folder",)),
    Case("generate-out-foreign", lambda ws, d: [*GEN, "--out", _foreign_folder(d)],
         ("is not a generation folder sensq wrote",)),
    Case("generate-out-root", lambda ws, d: [*GEN, "--out", "/"], ("'/' is the current, home or root folder",)),
    Case("demo-out-foreign", lambda ws, d: ["demo", "--model", "tiny", "--out", _foreign_folder(d)],
         ("is not a demo folder sensq wrote",)),
    Case("probe-out-foreign-file", lambda ws, d: ["probe", "--out", _foreign_file(d, "p.h5")],
         ("p.h5' exists; pass --resume to complete it or --overwrite",)),
    Case("plan-export-foreign-file", lambda ws, d: _export_over_a_foreign_file(ws, d),
         ("p.torchao.transformer.json' exists and is not a torchao export",)),
    Case("ablate-out-foreign", lambda ws, d: ["ablate", ws / "ranking.json", "--out", _foreign_folder(d)],
         ("is not a ablation folder sensq wrote",)),
    # -- option values that parse but cannot run ----------------------------------------------------------
    Case("max-sequence-length-0", lambda ws, d: [*GEN, "--max-sequence-length", "0", "--out", d / "g"],
         ("--max-sequence-length must be at least 1, got 0",)),
    Case("max-sequence-length-negative", lambda ws, d: ["probe", "--max-sequence-length", "-5", "--out", d / "p.h5"],
         ("got -5",)),
    Case("frames-beyond-rope", lambda ws, d: [*GEN, "--frames", "40001", "--out", d / "g"],
         ("40001 needs 10001 positions along one axis",)),
    Case("frames-beyond-memory", lambda ws, d: [*GEN, "--frames", "3997", "--height", "2048", "--width", "2048",
                                                "--out", d / "g"], ("GB are available",)),
    Case("frames-not-4k1", lambda ws, d: [*GEN, "--frames", "4", "--out", d / "g"],
         ("--frames must be 4k+1", "got 4")),
    Case("fps-0", lambda ws, d: [*GEN, "--fps", "0", "--out", d / "g"], ("'--fps': 0 is not in the range x>=1",), 2),
    Case("fps-negative", lambda ws, d: [*GEN, "--fps", "-3", "--out", d / "g"], ("-3 is not in the range",), 2),
    Case("device-mps", lambda ws, d: [*GEN, "--device", "mps", "--out", d / "g"],
         ("device 'mps' is not available in this torch build",)),
    Case("device-cuda-absent", lambda ws, d: ["probe", "--device", "cuda:0", "--out", d / "p.h5"],
         ("'cuda:0'",)),
    Case("device-unknown", lambda ws, d: ["probe", "--device", "banana", "--out", d / "p.h5"],
         ("unknown device 'banana'",)),
    Case("lora-not-safetensors", lambda ws, d: [*GEN, "--lora-high", _json(d, "l.safetensors", "text"), "--out",
                                                d / "g"], ("--lora-high", "is not a safetensors file",)),
    Case("lora-without-lora-keys", lambda ws, d: [*GEN, "--lora-low", ws / "ckpt" / "transformer" /
                                                  "weights.safetensors", "--out", d / "g"],
         ("holds no LoRA weights",)),
    Case("model-relative-missing", lambda ws, d: [*GEN, "--model", "./nope", "--out", d / "g"],
         ("model folder './nope' does not exist",)),
    Case("model-nested-missing", lambda ws, d: ["probe", "--model", "a/b/c", "--out", d / "p.h5"],
         ("model folder 'a/b/c' does not exist",)),
    Case("model-unknown-name", lambda ws, d: ["probe", "--model", "giant", "--out", d / "p.h5"],
         ("unknown model 'giant'",)),
    Case("budget-bare-5", lambda ws, d: ["plan", ws / "ranking.json", "--budget", "5", "--out", d / "p.json"],
         ("--budget '5' would mean 500%; write 5% or 0.05",)),
    Case("budget-over-100", lambda ws, d: ["plan", ws / "ranking.json", "--budget", "120%", "--out", d / "p.json"],
         ("--budget must be within 0..100%, got '120%'",)),
    Case("report-top-negative", lambda ws, d: ["report", ws / "ranking.json", "--top", "-3", "--out", d / "rep"],
         ("-3 is not in the range x>=1",), 2),
    Case("top-k-negative", lambda ws, d: ["plan", ws / "ranking.json", "--top-k", "-1", "--out", d / "p.json"],
         ("-1 is not in the range x>=0",), 2),
    Case("guidance-nan", lambda ws, d: [*GEN, "--guidance", "nan", "--out", d / "g"],
         ("--guidance must be a finite number, got nan",)),
    Case("sigmas-nan", lambda ws, d: ["probe", "--scheduler", "euler", "--steps", "2", "--sigmas", "1,nan", "--out",
                                      d / "p.h5"], ("--sigmas must be numbers in (0, 1], got 1.0,nan",)),
    Case("steps-0", lambda ws, d: ["generate", "--no-video", "--steps", "0", "--out", d / "g"],
         ("--steps must be at least 1",)),
    Case("height-not-16", lambda ws, d: [*GEN, "--height", "30", "--out", d / "g"],
         ("--height must be a positive multiple of 16, got 30",)),
    Case("limit-0", lambda ws, d: ["rank", ws / "probe.h5", "--limit", "0", "--out", d / "r.json"],
         ("0 is not in the range x>=1",), 2),
    Case("tokens-0", lambda ws, d: ["probe", "--tokens", "0", "--out", d / "p.h5"], ("must be at least 1",), 2),
    # -- generation folders met by eval -------------------------------------------------------------------
    Case("eval-truncated-frames", lambda ws, d: ["eval", _generation(ws, d, lambda m, run: (
        run / "frames" / "00000.npy").write_bytes((run / "frames" / "00000.npy").read_bytes()[:200])),
        "--reference", ws / "fp"], ("is truncated or not a .npy array",)),
    Case("eval-missing-latents", lambda ws, d: ["eval", _generation(ws, d, lambda m, run: (
        run / "latents" / "00000.safetensors").unlink()), "--reference", ws / "fp"],
        ("latents of prompt 0 missing",)),
    Case("eval-item-without-frames", lambda ws, d: ["eval", _generation(ws, d, lambda m, run: m["items"]["0"].pop(
        "frames")), "--reference", ws / "fp"], ("items.0 lacks the field 'frames'",)),
    Case("eval-not-a-generation", lambda ws, d: ["eval", _foreign_folder(d), "--reference", ws / "fp"],
         ("is not a generation folder (no manifest.json",)),
    Case("eval-reference-other-prompts", lambda ws, d: ["eval", _generation(ws, d, lambda m, run: _set(
        m["config"]["prompts"][0], 1, "a blue square")), "--reference", ws / "fp"],
        ("prompt 0 is 'a blue square'",)),
    Case("eval-reference-other-trajectory", lambda ws, d: ["eval", _generation(ws, d, lambda m, run: _set(
        m["config"]["trajectory"], "steps", 9)), "--reference", ws / "fp"],
        ("different trajectories (steps: 9 vs 3)",)),
    # == the newer features (issue 28): tiers, step ranges, calibration, block rankings, validation, single-expert
    # families, non-finite values and provenance ===========================================================
    Case("tiers-bits-nan", lambda ws, d: ["plan", _tiered(ws, d), "--tiers", "hif4,fp8_e4m3,bf16", "--bits", "nan",
                                          "--out", d / "p.json"], ("--bits must be a number", "got nan")),
    Case("tiers-bits-inf", lambda ws, d: ["plan", _tiered(ws, d), "--tiers", "hif4,fp8_e4m3,bf16", "--bits", "inf",
                                          "--out", d / "p.json"], ("up to 16", "got inf")),
    Case("tiers-bits-1e308", lambda ws, d: ["plan", _tiered(ws, d), "--tiers", "hif4,fp8_e4m3,bf16", "--bits",
                                            "1e308", "--out", d / "p.json"], ("got 1e+308",)),
    Case("tiers-bits-below-floor", lambda ws, d: ["plan", _tiered(ws, d), "--tiers", "hif4,fp8_e4m3,bf16", "--bits",
                                                  "2", "--out", d / "p.json"], ("--bits 2 is below the 4.500",)),
    Case("tiers-bits-negative", lambda ws, d: ["plan", _tiered(ws, d), "--tiers", "hif4,bf16", "--bits", "-1",
                                               "--out", d / "p.json"], ("--bits -1 is below",)),
    Case("tiers-empty", lambda ws, d: ["plan", _tiered(ws, d), "--tiers", "", "--bits", "6", "--out", d / "p.json"],
         ("--tiers needs at least two different formats", "got ''")),
    Case("tiers-one-format-twice", lambda ws, d: ["plan", _tiered(ws, d), "--tiers", "hif4,hif4", "--bits", "6",
                                                  "--out", d / "p.json"], ("got 'hif4,hif4'",)),
    Case("tiers-unknown-format", lambda ws, d: ["plan", _tiered(ws, d), "--tiers", "hif4,bogus", "--bits", "6",
                                                "--out", d / "p.json"], ("unknown format 'bogus'",)),
    Case("tiers-ranking-lacks-tier", lambda ws, d: ["plan", ws / "ranking.json", "--tiers", "hif4,fp8_e4m3,bf16",
                                                    "--bits", "6", "--out", d / "p.json"],
         ("the ranking has no 'fp8_e4m3' values",)),
    Case("tiers-without-bits", lambda ws, d: ["plan", _tiered(ws, d), "--tiers", "hif4,bf16", "--out", d / "p.json"],
         ("--tiers needs --bits",)),
    Case("tiers-with-budget", lambda ws, d: ["plan", _tiered(ws, d), "--tiers", "hif4,bf16", "--bits", "6",
                                             "--budget", "5%", "--out", d / "p.json"],
         ("give it without --budget/--top-k",)),
    Case("tiers-bits-alone", lambda ws, d: ["plan", ws / "ranking.json", "--budget", "5%", "--bits", "6", "--out",
                                            d / "p.json"], ("--bits goes with --tiers",), 2),
    Case("tiers-pareto-alone", lambda ws, d: ["plan", ws / "ranking.json", "--budget", "5%", "--pareto", "--out",
                                              d / "p.json"], ("--pareto goes with --tiers",), 2),
    Case("tiers-search-exact-with-budget", lambda ws, d: ["plan", ws / "ranking.json", "--budget", "5%", "--search",
                                                          "exact", "--out", d / "p.json"],
         ("--search exact goes with --tiers",)),
    Case("tiers-with-step-range", lambda ws, d: ["plan", _tiered(ws, d), "--tiers", "hif4,bf16", "--bits", "6",
                                                 "--protect-steps", "0-1", "--out", d / "p.json"],
         ("--protect-steps goes with --budget/--top-k",)),
    Case("tiers-nan-error", lambda ws, d: ["plan", _tiered(ws, d, lambda r: _set(_layer(r)["value"], "fp8_e4m3",
                                                                                 float("nan"))),
                                           "--tiers", "hif4,fp8_e4m3,bf16", "--bits", "6", "--out", d / "p.json"],
         ("NaN",)),
    Case("steps-open-end", lambda ws, d: ["plan", ws / "ranking.json", "--budget", "5%", "--protect-steps", "0-",
                                          "--out", d / "p.json"], ("got '0-'",)),
    Case("steps-past-last", lambda ws, d: ["plan", ws / "ranking.json", "--budget", "5%", "--protect-steps", "0-99",
                                           "--out", d / "p.json"],
         ("'0-99' reaches past the ranking's last step (2)",)),
    Case("steps-reversed", lambda ws, d: ["plan", ws / "ranking.json", "--budget", "5%", "--protect-steps", "2-1",
                                          "--out", d / "p.json"], ("0 <= A <= B, got '2-1'",)),
    Case("steps-negative", lambda ws, d: ["plan", ws / "ranking.json", "--budget", "5%", "--protect-steps", "-1",
                                          "--out", d / "p.json"], ("got '-1'",)),
    Case("steps-words", lambda ws, d: ["plan", ws / "ranking.json", "--budget", "5%", "--protect-steps", "a-b",
                                       "--out", d / "p.json"], ("got 'a-b'",)),
    Case("steps-from-block-ranking", lambda ws, d: ["plan", _block_ranking(ws, d), "--budget", "10%",
                                                    "--protect-steps", "0-1", "--out", d / "p.json"],
         ("--protect-steps orders layers by their per-step values", "rank with grad-e2e")),
    Case("steps-with-search", lambda ws, d: ["plan", ws / "ranking.json", "--budget", "5%", "--search", "e2e",
                                             "--protect-steps", "0-1", "--out", d / "p.json"],
         ("--search e2e chooses the protected set within --budget",)),
    Case("steps-rule-fraction", lambda ws, d: ["apply-plan", _plan(ws, d, lambda p: _set(p["rules"][0], "steps",
                                                                                       [0.5, 1])),
                                               "--out", d / "q"], ("steps",)),
    Case("steps-rule-negative", lambda ws, d: ["apply-plan", _plan(ws, d, lambda p: _set(p["rules"][0], "steps",
                                                                                       [-1, 0])),
                                               "--out", d / "q"], ("steps",)),
    Case("steps-rule-sigma-text", lambda ws, d: ["apply-plan", _plan(ws, d, lambda p: _set(
        p["rules"][0], "sigma", ["high", 1.0])), "--out", d / "q"], ("sigma",)),
    Case("calib-pooled-without-probe", lambda ws, d: ["apply-plan", ws / "plan.json", "--pooled-experts", "--out",
                                                      d / "q"], ("--pooled-experts goes with --probe",), 2),
    Case("calib-pooled-without-calibration", lambda ws, d: ["apply-plan", ws / "plan.json", "--probe",
                                                            ws / "probe.h5", "--pooled-experts", "--out", d / "q"],
         ("--pooled-experts goes with a calibration", "nothing here is calibrated"), 2),
    Case("calib-sequential-without-probe", lambda ws, d: ["apply-plan", ws / "plan.json", "--sequential-experts",
                                                          "--out", d / "q"], ("--sequential-experts goes with",), 2),
    Case("calib-another-model-without-probe", lambda ws, d: ["apply-plan", ws / "plan.json",
                                                             "--probe-from-another-model", "--out", d / "q"],
         ("--probe-from-another-model goes with --probe",), 2),
    Case("calib-unknown-method", lambda ws, d: ["apply-plan", ws / "plan.json", "--calibrate", "awq", "--out",
                                                d / "q"], ("'awq' is not one of",), 2),
    Case("calib-plan-option-unknown", lambda ws, d: ["plan", ws / "ranking.json", "--budget", "5%", "--calibration",
                                                     "smooth", "--out", d / "p.json"], ("'smooth' is not one of",), 2),
    Case("calib-ablate-gptq-without-probe", lambda ws, d: ["ablate", ws / "ranking.json", "--calibrate", "gptq",
                                                           "--out", d / "abl"], ("--probe",)),
    Case("calib-rule-calibration-number", lambda ws, d: ["apply-plan", _plan(ws, d, lambda p: _set(
        p["rules"][-1], "calibration", 7)), "--out", d / "q"], ("calibration must be a string or null, got 7",)),
    Case("calib-probe-other-model", lambda ws, d: ["apply-plan", ws / "plan.json", "--calibrate", "mse", "--probe",
                                                   _probe(ws, d, _attrs(model_fingerprint="00aa00aa00aa00aa")),
                                                   "--out", d / "q"], ("00aa00aa00aa00aa",)),
    Case("block-granularity-local", lambda ws, d: ["rank", ws / "probe.h5", "--metric", "mse", "--granularity",
                                                   "block", "--out", d / "r.json"],
         ("--granularity applies to --metric e2e only",), 2),
    Case("block-granularity-unknown", lambda ws, d: ["rank", ws / "probe.h5", "--metric", "e2e", "--granularity",
                                                     "head", "--out", d / "r.json"], ("'head' is not one of",), 2),
    Case("block-mode-local", lambda ws, d: ["rank", ws / "probe.h5", "--metric", "mse", "--mode", "leave-one-out",
                                            "--out", d / "r.json"], ("--mode",), 2),
    Case("block-ranking-tiers", lambda ws, d: ["plan", _block_ranking(ws, d, _add_tier), "--tiers",
                                               "hif4,fp8_e4m3,bf16", "--bits", "6", "--out", d / "p.json"],
         ("this ranking scores whole blocks (--granularity block); tier plans need a per-layer ranking",)),
    Case("block-ranking-nan", lambda ws, d: ["plan", _block_ranking(ws, d, lambda r: _every_value(r, float("nan"))),
                                             "--budget", "10%", "--out", d / "p.json"], ("NaN",)),
    Case("block-ranking-as-truth", lambda ws, d: ["rank", ws / "probe.h5", "--metric", "mse", "--validate",
                                                  _ranking(ws, d, _as_e2e(lambda r: _set(r, "granularity", "block"))),
                                                  "--out", d / "r.json"],
         ("--validate needs a per-layer e2e ranking", "granularity 'block'")),
    Case("validate-missing", lambda ws, d: ["rank", ws / "probe.h5", "--metric", "mse", "--validate", d / "e2e.json",
                                            "--out", d / "r.json"], ("ranking file not found", "e2e.json")),
    Case("validate-a-plan", lambda ws, d: ["rank", ws / "probe.h5", "--metric", "mse", "--validate", ws / "plan.json",
                                           "--out", d / "r.json"], ("has schema 'sensq.plan/1'",)),
    Case("validate-not-e2e", lambda ws, d: ["rank", ws / "probe.h5", "--metric", "mse", "--validate",
                                            ws / "ranking.json", "--out", d / "r.json"],
         ("--validate needs a per-layer e2e ranking (got metric 'grad-e2e'",)),
    Case("validate-other-model", lambda ws, d: ["rank", ws / "probe.h5", "--metric", "mse", "--validate", _ranking(
        ws, d, _as_e2e(lambda r: _set(r["provenance"], "model_fingerprint", "00aa00aa00aa00aa"))),
        "--out", d / "r.json"], ("was measured on another model (fingerprint 00aa00aa00aa00aa",)),
    Case("validate-other-trajectory", lambda ws, d: ["rank", ws / "probe.h5", "--metric", "mse", "--validate", _ranking(
        ws, d, _as_e2e(lambda r: _set(r["provenance"]["trajectory"], "steps", 8))), "--out", d / "r.json"],
         ("was measured along another trajectory (steps: 8 vs the probe's 3)",)),
    Case("validate-all-nan", lambda ws, d: ["rank", ws / "probe.h5", "--metric", "mse", "--validate",
                                            _ranking(ws, d, _as_e2e(lambda r: _every_value(r, float("nan")))),
                                            "--out", d / "r.json"], ("finite",)),
    Case("validate-no-shared-expert", lambda ws, d: ["rank", _wan21_probe(d), "--metric", "mse", "--validate",
                                                     _ranking(ws, d, _as_e2e()), "--out", d / "r.json"],
         ("another model",)),
    Case("single-guidance-2-generate", lambda ws, d: [*GEN, "--model", "tiny-wan21", "--guidance-2", "3", "--out",
                                                      d / "g"], ("--guidance-2 is the low-noise expert's CFG scale",
                                                                 "one expert (main)"), 2),
    Case("single-guidance-2-probe", lambda ws, d: ["probe", "--model", "tiny-wan21", "--guidance-2", "2", "--limit",
                                                   "1", "--out", d / "p.h5"], ("use --guidance",), 2),
    Case("single-lora-low", lambda ws, d: [*GEN, "--model", "tiny-wan21", "--lora-low",
                                           ws / "ckpt" / "transformer" / "weights.safetensors", "--out", d / "g"],
         ("has no 'low' expert (it has main)",)),
    Case("single-rank-expert-low", lambda ws, d: ["rank", _wan21_probe(d), "--expert", "low", "--out", d / "r.json"],
         ("expert 'low' is not in", "it has main")),
    Case("nonfinite-checkpoint-inf", lambda ws, d: [*GEN, "--model", _checkpoint(
        ws, d, change_weights=_nonfinite_weight(float("inf"))), "--out", d / "g"], ("holds NaN or Inf",)),
    Case("nonfinite-checkpoint-nan", lambda ws, d: ["probe", "--model", _checkpoint(
        ws, d, change_weights=_nonfinite_weight(float("nan"))), "--out", d / "p.h5"], ("holds NaN or Inf",)),
    Case("nonfinite-ranking-plan", lambda ws, d: ["plan", _ranking(ws, d, lambda r: _every_value(r, float("nan"))),
                                                  "--budget", "5%", "--out", d / "p.json"], ("NaN",)),
    Case("provenance-probe-without-layer-table", lambda ws, d: ["rank", _probe(ws, d, _drop_layer_table("low")),
                                                                "--metric", "mse", "--out", d / "r.json"],
         ("the 'low' expert", "holds no layer table", "--expert high")),
    Case("provenance-search-other-probe", lambda ws, d: ["plan", ws / "ranking.json", "--budget", "5%", "--search",
                                                         "e2e", "--probe", _wan21_probe(d), "--out", d / "p.json"],
         ("was probed on model 'tiny-wan21'",)),
    Case("export-not-a-checkpoint", lambda ws, d: ["export", ws / "fp", "--to", "gguf", "--out", d / "x"],
         ("expected 'sensq.checkpoint/1'",)),
    Case("export-unknown-target", lambda ws, d: ["export", ws / "ckpt", "--to", "onnx", "--out", d / "x"],
         ("'onnx' is not one of",), 2),
    Case("export-hif4-to-comfyui", lambda ws, d: ["export", ws / "ckpt", "--to", "comfyui", "--out", d / "x"],
         ("ComfyUI has no layout for sensq's hif4", "--format nvfp4_ts")),
    Case("export-out-foreign", lambda ws, d: ["export", ws / "ckpt", "--to", "gguf", "--out", _foreign_folder(d)],
         ("is not", "mine")),
    Case("export-fake-checkpoint", lambda ws, d: ["export", _fake_checkpoint(ws, d), "--to", "gguf", "--out",
                                                  d / "x"], ("fake-quant checkpoint",)),
    Case("audit-not-quantized-file", lambda ws, d: ["audit", _json(d, "high.safetensors", "text"), "--model", "tiny"],
         ("high.safetensors",)),
    Case("audit-unknown-expert", lambda ws, d: ["audit", _json(d, "middle.gguf", "x"), "--model", "tiny"],
         ("which expert is", "middle.gguf", "--expert")),
    Case("audit-missing-file", lambda ws, d: ["audit", d / "high.gguf", "--model", "tiny"],
         ("file not found", "high.gguf")),
    Case("audit-damaged-gguf", lambda ws, d: ["audit", _bytes(d, "low.gguf", b"GGUF\x03\x00\x00\x00garbage"),
                                              "--model", "tiny"], ("is not a readable GGUF file",)),
    Case("audit-expert-with-two-files", lambda ws, d: ["audit", ws / "probe.h5", ws / "plan.json", "--expert",
                                                       "high", "--model", "tiny"], ("--expert names the expert",), 2),
    Case("prompts-json-empty-item", lambda ws, d: ["probe", "--prompts", _json(d, "p.json", ["a red circle", ""]),
                                                   "--out", d / "p.h5"], ("item 1 is an empty prompt",)),
    Case("prompts-json-blank-item", lambda ws, d: ["prompts", _json(d, "p.json", ["  ", "a red circle"]), "--out",
                                                   d / "out.json"], ("item 0 is an empty prompt",)),
]


@pytest.mark.parametrize("command", [
    lambda ws, d: ["rank", ws / "probe.h5", "--out", d / "out" / "r.json"],
    lambda ws, d: ["plan", ws / "ranking.json", "--top-k", "1", "--out", d / "out" / "p.json"],
    lambda ws, d: ["report", ws / "ranking.json", "--out", d / "out" / "rep"],
    lambda ws, d: ["prompts", _json(d, "src.txt", "a red circle\n"), "--out", d / "out" / "p.json"],
    lambda ws, d: ["apply-plan", ws / "plan.json", "--out", d / "out" / "q"],
    lambda ws, d: [*GEN, "--out", d / "out" / "g"],
], ids=["rank", "plan", "report", "prompts", "apply-plan", "generate"])
def test_read_only_output_folder_is_refused_before_the_work(command, workspace, tmp_path, monkeypatch):
    import os

    import sensq.store.files as files

    (tmp_path / "out").mkdir()
    args = [str(a) for a in command(workspace, tmp_path)]
    real_access = os.access
    # chmod does not stop root (CI runs as root): make the permission check itself say no for that folder
    monkeypatch.setattr(files.os, "access", lambda path, mode: Path(path) != tmp_path / "out" and real_access(
        path, mode))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "is not writable" in result.stderr and str(tmp_path / "out") in result.stderr
    assert list((tmp_path / "out").iterdir()) == []


def _snapshot(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file() and ".lock" not in p.name}


NEWER_FEATURES = ("tiers-", "steps-", "calib-", "block-", "validate-", "single-", "nonfinite-", "provenance-",
                  "prompts-json-")


def test_enough_distinct_cases():
    assert len({case.name for case in CASES}) == len(CASES) >= 140
    assert sum(case.name.startswith(NEWER_FEATURES) for case in CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_clear_line(case, workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [str(a) for a in case.build(workspace, tmp_path)]
    before = _snapshot(workspace, tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == case.exit_code, (args, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.stderr
    if case.exit_code == 1:  # a failure is the one line; a usage error has click's usage lines above it
        assert [line for line in result.stderr.splitlines() if line.strip()] == errors, result.stderr
    for fragment in case.fragments:
        assert fragment in errors[0], (fragment, errors[0])
    after = _snapshot(workspace, tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before, "a file that existed before changed"
