"""torchrun shards prompts across ranks (gloo on CPU); rank 0 merges: same data as one process."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sensq.errors import InputError
from sensq.store.merge import merge_probe_files
from sensq.store.probe_file import ProbeFile

ARGS = ["probe", "--limit", "3", "--steps", "3", "--tokens", "8", "--json"]


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
            "-m", "sensq.cli"]


def test_two_ranks_equal_one_process(tmp_path):
    single, sharded = tmp_path / "single.h5", tmp_path / "sharded.h5"
    subprocess.run([sys.executable, "-m", "sensq.cli", *ARGS, "--out", str(single)], check=True, capture_output=True)
    result = subprocess.run([*_torchrun(), *ARGS, "--out", str(sharded)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["prompts_total"] == 3 and summary["prompts_run"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded.h5", "single.h5"]  # parts removed
    with ProbeFile(single) as one, ProbeFile(sharded) as two:
        assert list(two.prompt_index) == [0, 1, 2] and two.done.all()
        assert one.trajectory_table() == two.trajectory_table()
        for expert in one.experts:
            assert one.layers(expert) == two.layers(expert)
            for layer in one.layers(expert):
                for stat in ("channel_absmax", "token_absmax", "samples"):
                    np.testing.assert_array_equal(one.read(expert, layer, stat), two.read(expert, layer, stat))


def test_merge_refuses_incomplete_or_foreign_parts(tmp_path):
    from click.testing import CliRunner

    from sensq.cli import main

    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    runner = CliRunner()
    assert runner.invoke(main, ["probe", "--limit", "1", "--steps", "2", "--out", str(a)]).exit_code == 0
    shutil.copy(a, b)
    with pytest.raises(InputError, match="share prompt indices"):
        merge_probe_files([a, b], tmp_path / "m.h5")
    assert runner.invoke(main, ["probe", "--limit", "1", "--steps", "3", "--overwrite", "--out", str(b)]).exit_code == 0
    with pytest.raises(InputError, match="differs from .* in trajectory: not one run"):
        merge_probe_files([a, b], tmp_path / "m.h5")
    assert not Path(tmp_path / "m.h5").exists()


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> Path:
    """Two prompts, two steps, both experts: what the two ranking tests rank."""
    probe = tmp_path_factory.mktemp("distributed") / "p.h5"
    subprocess.run([sys.executable, "-m", "sensq.cli", "probe", "--limit", "2", "--steps", "2", "--out", str(probe)],
                   check=True, capture_output=True)
    return probe


def _rank_once_and_on_two_ranks(tmp_path, probe: Path, rank_args: list[str]) -> tuple[dict, dict]:
    """The same ``sensq rank`` of ``probe`` in one process and under torchrun with two gloo ranks."""
    args = ["rank", str(probe), *rank_args, "--json"]
    single = subprocess.run([sys.executable, "-m", "sensq.cli", *args, "--out", str(tmp_path / "one.json")],
                            capture_output=True, text=True, check=True)
    sharded = subprocess.run([*_torchrun(), *args, "--out", str(tmp_path / "two.json")], capture_output=True,
                             text=True, timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    return json.loads(single.stdout), json.loads(sharded.stdout)


def test_e2e_rank_split_across_two_ranks(tmp_path, probed):
    one, two = _rank_once_and_on_two_ranks(tmp_path, probed, ["--metric", "e2e", "--limit", "1", "--expert", "high"])
    values = {layer["name"]: layer["value"] for layer in one["experts"]["high"]}
    assert {layer["name"]: layer["value"] for layer in two["experts"]["high"]} == values
    assert len(values) == 27


def test_grad_e2e_rank_split_across_two_ranks(tmp_path, probed):
    """Prompts are split across ranks and the sums gathered: the same scores as one process (each prompt's
    projections are seeded by its index, so the sharding does not change them; summation order may)."""
    one, two = _rank_once_and_on_two_ranks(tmp_path, probed, ["--metric", "grad-e2e", "--projections", "2"])
    for expert in ("high", "low"):
        values = {layer["name"]: layer["value"]["hif4"] for layer in one["experts"][expert]}
        split = {layer["name"]: layer["value"]["hif4"] for layer in two["experts"][expert]}
        assert split.keys() == values.keys()
        assert all(v > 0 for v in values.values())
        np.testing.assert_allclose([split[k] for k in values], list(values.values()), rtol=1e-9)
