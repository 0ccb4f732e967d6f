"""Progress on long stages: a bar with done/total and an ETA on a terminal; nothing under --json or in logs."""

import io
import os
import sys

import torch
from click.testing import CliRunner
from rich.console import Console

import sensq.cli.common as common
from sensq.cli import main
from sensq.cli.common import progress_bar


def test_progress_bar_on_a_terminal_and_quiet_elsewhere():
    buffer = io.StringIO()
    with progress_bar("rank (mse)", stream=Console(file=buffer, force_terminal=True, width=120)) as update:
        for done in range(1, 4):
            update("high", done, 3)
    assert "rank (mse)" in buffer.getvalue() and "high" in buffer.getvalue() and "3/3" in buffer.getvalue()
    assert f"{torch.get_num_threads()} threads" in buffer.getvalue()  # long commands say what they use
    with progress_bar("rank", stream=Console(file=io.StringIO())) as update:
        assert update is None  # not a terminal: no bar, and the library skips its callbacks
    with progress_bar("rank", enabled=False, stream=Console(file=io.StringIO(), force_terminal=True)) as update:
        assert update is None


def _terminal(monkeypatch):
    monkeypatch.setattr(common, "console", lambda stderr=False: Console(file=sys.stderr if stderr else sys.stdout,
                                                                         force_terminal=True, width=150))


def test_rank_and_apply_plan_show_progress_on_a_terminal(workspace, tmp_path, monkeypatch):
    _terminal(monkeypatch)
    runner = CliRunner()
    result = runner.invoke(main, ["rank", str(workspace / "probe.h5"), "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "rank (grad-e2e)" in result.stderr and "threads" in result.stderr
    result = runner.invoke(main, ["rank", str(workspace / "probe.h5"), "--metric", "e2e", "--granularity", "block",
                                  "--limit", "1", "--out", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    assert "rank (e2e)" in result.stderr and "high e2e" in result.stderr
    result = runner.invoke(main, ["apply-plan", str(workspace / "plan.json"), "--probe", str(workspace / "probe.h5"),
                                  "--calibrate", "mse", "--out", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    assert "calibrate (mse) blocks" in result.stderr
    quiet = runner.invoke(main, ["rank", str(workspace / "probe.h5"), "--out", str(tmp_path / "r.json"), "--json"])
    assert quiet.exit_code == 0 and "rank (grad-e2e)" not in quiet.stderr


def test_threads_reach_numba_when_it_is_imported_later():
    """A command that has not imported numba yet does not import it to size its pool: the pool takes the
    count when numba is imported (checked in a fresh process); a NUMBA_NUM_THREADS set lower stays the bound."""
    import subprocess
    import sys

    code = ("import sys; from sensq.runtime import set_threads; set_threads(1); assert 'numba' not in sys.modules; "
            "import numba; print(numba.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "1", result.stderr[-2000:]


def test_threads_sets_torch_and_numba_together(monkeypatch):
    import numba

    before = torch.get_num_threads(), numba.get_num_threads()
    try:
        result = CliRunner().invoke(main, ["--threads", "1", "formats", "--json"])
        assert result.exit_code == 0, result.output
        assert (torch.get_num_threads(), numba.get_num_threads()) == (1, 1)
        monkeypatch.setenv("SENSQ_THREADS", "0")
        refused = CliRunner().invoke(main, ["formats"])
        assert refused.exit_code == 2 and "--threads" in refused.output
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])
