"""sensq ablate and sensq demo, end to end on the embedded tiny model."""

import json

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
