"""experiments/study/run_study.sh runs end to end (the tiny config, cut down), from an OpenS2V-Eval-style prompt
file through probe, rank, plan, apply-plan, Table III and the ablation, and resumes without redoing work."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "study" / "run_study.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_tiny_study_runs_and_resumes(tmp_path):
    source = tmp_path / "Open-Domain_Eval.json"
    source.write_text(json.dumps({
        "singleobj_1": {"img_paths": ["a.jpg"], "prompt": "a red circle moving left on a dark background"},
        "singleobj_2": {"img_paths": ["b.jpg"], "prompt": "a red circle moving left on a dark background"},
        "singleface_1": {"img_paths": ["c.jpg"], "prompt": "a white square moving up on a gray background"},
        "humanobj_1": {"img_paths": ["d.jpg"], "prompt": "a blue triangle moving down on a gray background"},
    }))
    out = tmp_path / "study"
    env = {**os.environ, "SENSQ": f"{sys.executable} -m sensq.cli", "PYTHON": sys.executable, "OUT": str(out),
           "OPENS2V": str(source), "FILTER_ARGS": "--exclude-type singleface --dedupe", "LIMIT": "2",
           "FORMATS": "hif4,nvfp4", "STEPS": "4", "APPLY_ARGS": "--calibrate mse",
           "ORIGINAL_ARGS": "--scheduler euler --shift 3 --guidance 4 --guidance-2 4 --steps 8 --no-video",
           "ABLATE_ARGS": "--sets none,budget --budget 30% --seeds 1",
           "MODEL": "tiny-trained"}  # the script, cut down, on the fast model (each step's own tests cover the rest)
    config = ROOT / "experiments" / "study" / "tiny.env"
    result = subprocess.run(["bash", str(SCRIPT), str(config)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    prompts = json.loads((out / "prompts.json").read_text())
    assert [p["key"] for p in prompts] == ["singleobj_1", "humanobj_1"]  # face type and the repeat dropped
    table = (out / "table3.md").read_text().splitlines()
    assert table[2].startswith("| 8 | original full precision |")
    assert table[3].startswith("| 4 | same-step full precision |") and table[4].startswith("| 4 | quantized")
    assert "latent_nmse vs FP" in table[0] and "average" in table[0]
    quantized_row = table[4].split("|")
    assert float(quantized_row[table[0].split("|").index(" latent_nmse vs FP ")]) > 0
    assert (out / "ablation" / "ablation.html").is_file() and (out / "ranking-report").is_dir()
    manifest = json.loads((out / "runs" / "quantized-4" / "manifest.json").read_text())
    assert [p[1] for p in manifest["config"]["prompts"]] == [p["prompt"] for p in prompts]

    report_stamp = (out / "ranking-report" / "report.html").stat().st_mtime_ns
    again = subprocess.run(["bash", str(SCRIPT), str(config)], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "0 generated" in again.stderr + again.stdout and "2 generated" not in again.stderr + again.stdout
    assert "prompts: 0 run, 2 already complete" in again.stdout
    assert (out / "ranking-report" / "report.html").stat().st_mtime_ns == report_stamp  # not drawn again
