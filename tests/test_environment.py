"""The suite and the CLI do not depend on how or where they are started (issue: tests assumed an
interactive foreground shell). Each case is an assumption a user can plausibly break."""

import json
import os
import stat
import subprocess
import sys

import pytest

SENSQ = [sys.executable, "-m", "sensq.cli"]


@pytest.fixture
def hostile_env(tmp_path):
    """Another working directory, a read-only HOME, TMPDIR on a fresh folder, the C locale, a 40-column
    non-terminal output."""
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(stat.S_IRUSR | stat.S_IXUSR)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG"))}
    env.update(HOME=str(home), TMPDIR=str(tmp), LC_ALL="C", LANG="C", COLUMNS="40", TERM="dumb")
    work = tmp_path / "elsewhere"
    work.mkdir()
    yield env, work
    home.chmod(stat.S_IRWXU)


def test_the_chain_runs_from_elsewhere_with_a_read_only_home_and_the_c_locale(hostile_env):
    env, work = hostile_env
    for args in (["formats"], ["probe", "--limit", "1", "--steps", "2", "--out", "p.h5"],
                 ["rank", "p.h5", "--metric", "mse", "--top", "3", "--out", "r.json"],
                 ["plan", "r.json", "--budget", "10%", "--out", "plan.json"]):
        result = subprocess.run(SENSQ + args, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
    assert json.loads((work / "plan.json").read_text())["schema"] == "sensq.plan/1"
    assert os.listdir(env["HOME"]) == []


def test_a_bad_input_is_one_line_in_a_narrow_non_terminal(hostile_env):
    env, work = hostile_env
    result = subprocess.run(SENSQ + ["rank", "missing.h5"], cwd=work, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "missing.h5" in result.stderr
