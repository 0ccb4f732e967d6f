"""sensq ablate and sensq demo, end to end on the embedded tiny model."""

import json

import pytest
import torch
from click.testing import CliRunner

from sensq.cli import main


def test_demo_end_to_end_and_resume(tmp_path):
    runner = CliRunner()
    out = tmp_path / "demo"
    args = ["demo", "--model", "tiny", "--prompts", "2", "--steps", "3", "--budget", "70%", "--out", str(out)]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    for path in ("probe.h5", "ranking.json", "plan.json", "quantized/manifest.json", "runs/quantized/scores.json",
                 "ablation/ablation.json", "ablation/ablation.html", "ranking-report/report.html"):
        assert (out / path).is_file(), path
    result = json.loads((out / "ablation" / "ablation.json").read_text())
    names = [row["set"] for row in result["rows"]]
    assert names[:2] == ["none", "entrance"] and "entrance, high only" in names
    none = result["rows"][0]
    assert none["protected_share"] == {"high": 0.0, "low": 0.0} and none["metrics"]["latent_nmse"] > 0
    mtime = (out / "runs" / "quantized" / "manifest.json").stat().st_mtime
    second = runner.invoke(main, args)
    assert second.exit_code == 0, second.output
    assert (out / "runs" / "quantized" / "manifest.json").stat().st_mtime == mtime  # nothing regenerated
    again = runner.invoke(main, ["report", str(out / "ablation")])
    assert again.exit_code == 0 and "ablation.html" in again.output


def test_ablate_command(tmp_path):
    runner = CliRunner()
    probe, ranking = tmp_path / "p.h5", tmp_path / "r.json"
    assert runner.invoke(main, ["probe", "--limit", "1", "--steps", "3", "--out", str(probe)]).exit_code == 0
    assert runner.invoke(main, ["rank", str(probe), "--out", str(ranking)]).exit_code == 0
    result = runner.invoke(main, ["ablate", str(ranking), "--top-k", "1", "--budget", "80%", "--limit", "1",
                                  "--out", str(tmp_path / "abl"), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["set"] for r in rows] == ["none", "entrance", "entrance + top-1", "budget 80%", "entrance, high only",
                                        "entrance, low only"]
    bad = runner.invoke(main, ["ablate", str(ranking), "--budget", "500%"])
    assert bad.exit_code == 1 and "--budget must be within 0..100%" in bad.output
    chosen = runner.invoke(main, ["ablate", str(ranking), "--sets", "none,budget", "--budget", "80%", "--limit", "1",
                                  "--seeds", "1", "--out", str(tmp_path / "some"), "--json"])
    assert chosen.exit_code == 0, chosen.output
    assert [r["set"] for r in json.loads(chosen.stdout)["rows"]] == ["none", "budget 80%"]  # only the kinds named
    assert "--sets none,budget" in (tmp_path / "some" / "ablation.md").read_text()  # in the command that reruns it


def test_an_ablation_row_is_what_apply_plan_and_generate_deploy(workspace, tmp_path):
    """The same plan, calibration and backend give the same latents whether measured by sensq ablate or
    deployed with sensq apply-plan and generated with sensq generate --model CKPT."""
    from safetensors.torch import load_file

    runner = CliRunner()
    out = tmp_path / "abl"
    result = runner.invoke(main, ["ablate", str(workspace / "ranking.json"), "--top-k", "1", "--budget", "70%",
                                  "--seeds", "1", "--limit", "2", "--calibrate", "mse", "--probe",
                                  str(workspace / "probe.h5"), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    row = next(r for r in json.loads(result.stdout)["rows"] if r["set"] == "budget 70%")
    seed_folder = out / row["folder"] / "seed-10007"  # the first held-out seed set
    deployed = tmp_path / "q"
    applied = runner.invoke(main, ["apply-plan", str(out / row["folder"] / "plan.json"), "--probe",
                                   str(workspace / "probe.h5"), "--calibrate", "mse", "--out", str(deployed)])
    assert applied.exit_code == 0, applied.output
    generated = runner.invoke(main, ["generate", "--model", str(deployed), "--limit", "2", "--steps", "3", "--no-video",
                                     "--seed", "10007", "--out", str(tmp_path / "g")])
    assert generated.exit_code == 0, generated.output
    for index in ("00000", "00001"):
        ours = load_file(seed_folder / "latents" / f"{index}.safetensors")["latents"]
        theirs = load_file(tmp_path / "g" / "latents" / f"{index}.safetensors")["latents"]
        assert torch.equal(ours, theirs), index
    uncalibrated = runner.invoke(main, ["ablate", str(workspace / "ranking.json"), "--top-k", "1", "--budget", "70%",
                                        "--seeds", "1", "--limit", "2", "--out", str(tmp_path / "abl-none"), "--json"])
    other = next(r for r in json.loads(uncalibrated.stdout)["rows"] if r["set"] == "budget 70%")
    assert other["metrics"]["latent_nmse"] != row["metrics"]["latent_nmse"]  # calibration is part of what is measured


def test_ablation_intervals_comparisons_and_headline(workspace, tmp_path):
    result = CliRunner().invoke(main, ["ablate", str(workspace / "ranking.json"), "--top-k", "2", "--budget", "60%",
                                       "--random", "2", "--seeds", "2", "--limit", "2", "--out", str(tmp_path / "a"),
                                       "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["seeds"] == [10007, 20014]
    names = [r["set"] for r in data["rows"]]
    assert names[-2:] == ["random 60% #1", "random 60% #2"]
    for row in data["rows"]:
        assert len(row["per_item"]) == 4  # 2 prompts x 2 seeds
        interval = row["intervals"]["latent_nmse"]
        assert interval["low"] <= interval["mean"] <= interval["high"] and interval["n"] == 4
        values = [item["latent_nmse"] for item in row["per_item"].values()]
        assert interval["mean"] == pytest.approx(sum(values) / 4)
        share = row["protected_share"]
        if row["set"].startswith("random"):
            assert all(0.4 <= v <= 0.6 for v in share.values())
    pairs = {(c["a"], c["b"]) for c in data["comparisons"] if c["metric"] == "latent_nmse"}
    assert len(pairs) == len(names) * (len(names) - 1) // 2
    head = data["headline"]
    ranked = [r for r in data["rows"] if r["set"].startswith(("budget", "entrance + top"))]
    assert head["set"] == min(ranked, key=lambda r: r["metrics"]["latent_nmse"])["set"]
    assert head["real_size"]["weight_gb_bf16"] == pytest.approx(2 * 14_288_491_584 * 2 / 1e9, rel=0.01)
    page = (tmp_path / "a" / "ablation.html").read_text()
    assert "Recommended:" in page and "full precision" in page and "distinguishable from noise" in page
    assert "--random 2 --seeds 2" in page  # the stated command reproduces these numbers


def test_ablate_plans_measures_plan_files_as_apply_plan_deploys_them(workspace, tmp_path):
    """--plans: 'none' and each file, named after it; a plan whose rule asks for GPTQ gives, bit for bit, what
    apply-plan (GPTQ codes packed) + generate --model CKPT give."""
    from safetensors.torch import load_file

    plan = {"schema": "sensq.plan/1", "rules": [
        {"match": r"re:(high|low):blocks\.0\..*", "weight": None, "activation": None},
        {"match": r"re:high:blocks\.1\..*", "weight": "hif4", "activation": "hif4", "calibration": "gptq"},
        {"match": "re:(high|low):.*", "weight": "hif4", "activation": "hif4"}]}
    (tmp_path / "gptq-block1.json").write_text(json.dumps(plan))
    runner = CliRunner()
    out = tmp_path / "abl"
    args = ["ablate", str(workspace / "ranking.json"), "--plans", str(tmp_path / "gptq-block1.json"), "--only-plans",
            "--seeds", "1",
            "--limit", "2", "--out", str(out), "--json"]
    refused = runner.invoke(main, args)
    assert refused.exit_code == 1 and "'calibration' rules need --probe" in refused.output
    result = runner.invoke(main, args + ["--probe", str(workspace / "probe.h5")])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["set"] for r in rows] == ["none", "gptq-block1"]
    assert "plan rules name their own in gptq-block1 (gptq)" in (out / "ablation.md").read_text()
    assert "no recommendation: compare the sets" in (out / "ablation.md").read_text()
    applied = runner.invoke(main, ["apply-plan", str(tmp_path / "gptq-block1.json"), "--probe",
                                   str(workspace / "probe.h5"), "--out", str(tmp_path / "q")])
    assert applied.exit_code == 0, applied.output
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["layers"]["high:blocks.1.attn1.to_q"]["calibration"] == "gptq"
    generated = runner.invoke(main, ["generate", "--model", str(tmp_path / "q"), "--limit", "2", "--steps", "3",
                                     "--no-video", "--seed", "10007", "--out", str(tmp_path / "g")])
    assert generated.exit_code == 0, generated.output
    for index in ("00000", "00001"):
        ours = load_file(out / rows[1]["folder"] / "seed-10007" / "latents" / f"{index}.safetensors")["latents"]
        theirs = load_file(tmp_path / "g" / "latents" / f"{index}.safetensors")["latents"]
        assert torch.equal(ours, theirs), index


def test_the_ablation_cache_tells_plans_apart_by_calibration_and_step_range():
    """A set whose plan changes only its calibration or its step range must not reuse the old generations."""
    from sensq.ablate import hash_rules
    from sensq.plan import Plan, Rule

    plain = [Rule("re:high:blocks\\.0\\..*", None, None), Rule("re:(high|low):.*", "hif4", "hif4")]
    digests = {hash_rules(Plan(plain)),
               hash_rules(Plan([plain[0], Rule("re:(high|low):.*", "hif4", "hif4", calibration="gptq")])),
               hash_rules(Plan([Rule("re:high:blocks\\.0\\..*", None, None, steps=(0, 0)), plain[1]])),
               hash_rules(Plan([Rule("re:high:blocks\\.0\\..*", None, None, steps=(3, 3)), plain[1]])),
               hash_rules(Plan([Rule("re:high:blocks\\.0\\..*", None, None, sigma=(0.0, 0.5)), plain[1]]))}
    assert len(digests) == 5
    import zlib  # a plan without calibration or ranges keeps the digest older ablation folders were made with

    assert hash_rules(Plan(plain)) == zlib.crc32(repr([(r.match, r.weight, r.activation) for r in plain]).encode())
