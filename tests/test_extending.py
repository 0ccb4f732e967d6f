"""Each extension point is one module plus its registration (docs/extending.md): a number format, a calibration
method (with a weight step of its own), a kind of protected set, an export target and a model family, the toys
of tests/extending/. Registered through the public API, they run end to end together: probe, rank, plan,
apply-plan, generate and ablate on the toy family in the toy format with the toy calibration and set kind; the
CLI loads them from SENSQ_PLUGINS and offers them in its choices; the toy target exports a checkpoint."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TOYS = tuple(f"tests.extending.toy_{kind}" for kind in ("format", "calibration", "sets", "target", "family"))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def toys():
    """The toy modules, registered for the test and unregistered after it (imported here, not at collection: a
    plugin registers when imported, and no other test may see the toys)."""
    modules = [importlib.import_module(name) for name in TOYS]
    for toy in modules:
        toy.register()
    yield dict(zip(("format", "calibration", "sets", "target", "family"), modules, strict=True))
    for toy in modules:
        toy.unregister()


def test_the_toys_run_the_method_end_to_end(toys, tmp_path):
    from sensq.ablate import run_ablation, standard_sets
    from sensq.generate import GenerateRequest, generate
    from sensq.models import family_of
    from sensq.plan import build_plan
    from sensq.probes.recorder import ProbeRequest, run_probe
    from sensq.prompts import load_prompts
    from sensq.quant import dequantize_, is_quantized
    from sensq.quant.apply import apply_plan
    from sensq.sensitivity import RankRequest, rank_layers
    from sensq.trajectory import Trajectory

    model = toys["family"].load()
    assert family_of(model.pipe).name == "toy-wan" and model.family.experts(model.pipe) == ["main"]
    trajectory = Trajectory(steps=2).with_resolution(model.default_resolution)
    prompts = load_prompts(None, 1)
    run_probe(ProbeRequest(model, trajectory, prompts, ["main"], tmp_path / "probe.h5"))
    ranking = rank_layers(RankRequest(tmp_path / "probe.h5", model, ["toy_int3"], metric="mse"))
    assert ranking.provenance["family"] == "toy-wan" and ranking.formats == ["toy_int3"]
    plan = build_plan(ranking, budget=0.2, fmt="toy_int3")
    entrance = plan.rules[0]  # from an mse ranking the family's entrance comes first: the toy's is one layer
    assert entrance.weight is None and "patch_embedding" in entrance.match and "blocks" not in entrance.match
    table, calibration = apply_plan(model, plan, calibrate="toy-clip")  # needs no probe: its step needs no data
    expert = model.family.expert_module(model.pipe, "main")
    quantized = {name: module for name, module in expert.named_modules() if is_quantized(module)}
    assert quantized and {m.weight_format.name for m in quantized.values()} == {"toy_int3"}
    assert {c.method for c in calibration["main"].values()} == {"toy-clip"}
    assert {m.weight_clip for m in quantized.values()} == {toys["calibration"].CLIP}
    generated = generate(GenerateRequest(model, trajectory, prompts, tmp_path / "q", write_video=False))
    latents = load_file(str(tmp_path / "q" / "latents" / "00000.safetensors"))["latents"]
    assert generated.generated == 1 and torch.isfinite(latents).all()
    dequantize_(model)
    sets = standard_sets(model, ranking, "toy_int3", top_ks=(), budgets=(0.2,), builders=["none", "last-block"])
    result = run_ablation(model, trajectory, prompts, sets, tmp_path / "ablation", fmt="toy_int3", seeds=1)
    rows = {row["set"]: row for row in result["rows"]}
    assert set(rows) == {"none", "last block"} and rows["last block"]["kind"] == "fixed"
    from sensq.models import quantizable_layers

    last = [name for name, _ in quantizable_layers(expert) if name.startswith("blocks.1.")]  # tiny-wan21: 2 blocks
    assert rows["last block"]["protected_layers"]["main"] == len(last) == 10
    assert rows["last block"]["metrics"]["latent_nmse"] < rows["none"]["metrics"]["latent_nmse"]


HELPS = """
import sys
from click.testing import CliRunner
from sensq.cli import main
for command in sys.argv[2].split(","):
    print(CliRunner().invoke(main, [command, "--help"]).output)
"""


def _sensq(*args, cwd: Path, script: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SENSQ_PLUGINS": ",".join(TOYS),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "sensq.cli"]
    return subprocess.run([*command, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_cli_loads_plugins_and_offers_them(workspace, tmp_path):
    listed = _sensq("formats", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "toy_int3" in {row["name"] for row in json.loads(listed.stdout)}
    helps = _sensq("--help-of", "apply-plan,ablate,export", cwd=tmp_path, script=HELPS)
    assert helps.returncode == 0, helps.stderr
    assert "toy-clip" in helps.stdout and "last-block" in helps.stdout and "toy-bf16" in helps.stdout
    exported = _sensq("export", workspace / "ckpt", "--to", "toy-bf16", "--out", tmp_path / "bf16", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    from sensq.export.wan_names import wan_name
    from sensq.quant.checkpoint import load_quantized
    from sensq.quant.deployed import is_deployed

    model = load_quantized(workspace / "ckpt")
    for expert in model.family.experts(model.pipe):
        written = load_file(str(tmp_path / "bf16" / f"{expert}.safetensors"))
        deployed = {wan_name(name): sub.decoded_weight() for name, sub in
                    model.family.expert_module(model.pipe, expert).named_modules() if is_deployed(sub)}
        assert deployed and all(torch.equal(written[f"{key}.weight"].reshape(weight.shape),
                                            weight.to(torch.bfloat16)) for key, weight in deployed.items())
    report = json.loads((tmp_path / "bf16" / "export.json").read_text())
    assert {row["target_type"] for row in report["layers"]} == {"bf16"}


def test_a_plugin_that_fails_is_one_line(tmp_path):
    env = {**os.environ, "SENSQ_PLUGINS": "no_such_module_for_sensq"}
    result = subprocess.run([sys.executable, "-m", "sensq.cli", "formats"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "sensq plugin 'no_such_module_for_sensq' failed to load" in lines[0], result.stderr
