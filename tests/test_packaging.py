"""What gets installed: sensq and its sub-packages, and nothing named `cli` or `kernels` at top level."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_top_level_kernels_and_cli_are_not_ours(tmp_path):
    code = (
        "import importlib.util, sys\n"
        "for name in ('kernels', 'cli', 'probes'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    print(name, spec.origin if spec else None)\n"
    )
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr
    for line in result.stdout.splitlines():
        name, origin = line.split(" ", 1)
        ours = str(REPO / name) + "/"
        assert origin == "None" or not origin.startswith(ours), f"top-level {name!r} resolves to {origin}"


def test_subpackages_import_from_outside_the_repo(tmp_path):
    result = _run("import sensq.cli, sensq.kernels, sensq.probes, sensq.formats; "
                  "print(sensq.kernels.__file__)", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(str(Path("kernels") / "__init__.py"))


def test_import_does_not_load_numba_or_diffusers(tmp_path):
    result = _run("import sys, sensq, sensq.formats, sensq.kernels; "
                  "print(sorted(m for m in ('numba', 'diffusers', 'rich') if m in sys.modules))", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_subpackage_is_listed_in_setup_cfg():
    """A non-editable install only ships the packages setup.cfg lists: keep the list complete."""
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {"sensq." + p.parent.relative_to(REPO / "sensq").as_posix().replace("/", ".")
             for p in (REPO / "sensq").rglob("__init__.py") if p.parent != REPO / "sensq"}
    found |= {"sensq", "sensq.cli", "sensq.probes", "sensq.kernels"}
    assert found == listed


def test_the_clone_root_kernels_folder_yields_to_the_pypi_kernels_package():
    """From a clone's root, ``import kernels`` must still find Hugging Face's ``kernels`` (transformers imports
    it on a CUDA machine); sensq's own kernels stay reachable as ``sensq.kernels``."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("kernels")
    except PackageNotFoundError:
        pytest.skip("the PyPI package 'kernels' is not installed")
    root = Path(__file__).resolve().parent.parent
    code = ("import kernels, sensq.kernels as own; print(kernels.__file__); print(own.__file__); "
            "print(hasattr(kernels, 'get_kernel'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    pypi, own, has_api = out.stdout.split()
    assert Path(own).parent == root / "kernels"
    assert Path(pypi).parent != root / "kernels" and has_api == "True"
