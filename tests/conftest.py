import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

if not torch.cuda.is_available():
    # Triton kernels run in the CPU interpreter; triton reads this once, so set it before anything imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")

GOLDEN_FILE = Path(os.environ.get("SENSQ_GOLDEN", Path(__file__).parent / "golden" / "hif4_public.safetensors"))


def golden_cases() -> list[str]:
    """Case names in the golden file (SENSQ_GOLDEN points at another file, e.g. a held-out set)."""
    with safe_open(GOLDEN_FILE, "pt") as f:
        return sorted(k for k in f.metadata() if k not in ("reference", "call"))


def load_golden(name: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    with safe_open(GOLDEN_FILE, "pt") as f:
        meta = json.loads(f.metadata()[name])
        return f.get_tensor(f"{name}.x"), f.get_tensor(f"{name}.y"), meta


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def hide_package(monkeypatch):
    """``hide_package("matplotlib")``: make importing that package (and its submodules) fail, as if it
    were not installed, for the rest of the test."""
    import builtins

    real_import = builtins.__import__

    def hide(prefix: str) -> None:
        def fake_import(name, *args, **kwargs):
            if name == prefix or name.startswith(prefix + "."):
                raise ImportError(name)
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", fake_import)

    return hide


def awkward_tensor(shape, seed: int = 0, dtype=torch.float32, spread: int = 20, boundaries: bool = False):
    """Seeded test input for the kernels: Gaussian values times 2^(k/2) for k in [-spread, spread), with zeros of
    both signs, inf, NaN and subnormals at fixed strides; with ``boundaries`` also values a few ulp below powers
    of two and on E2M1 rounding ties (where an inexact log2 or round would show)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-spread, spread, shape, generator=g).float() / 2)
    flat = x.view(-1)
    if boundaries:
        near = torch.exp2(torch.randint(-20, 20, flat[5::7].shape, generator=g).float())
        flat[5::7] = near * (1 - 2.0**-24 * torch.randint(0, 4, near.shape, generator=g).float())
        tie_values = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
        ties = tie_values[torch.randint(0, 7, flat[6::11].shape, generator=g)]
        flat[6::11] = ties * 2.0 ** torch.randint(-3, 3, (1,), generator=g).item()
    flat[::97] = 0.0
    flat[1::131] = -0.0
    flat[2::389] = float("inf")
    flat[3::1009] = float("nan")
    flat[4::211] = 1e-40
    return x.to(dtype)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """One real run of the chain on the embedded tiny model, through the CLI: ``probe.h5`` (2 prompts, 3 steps,
    CFG), ``ranking.json``, ``plan.json``, a packed checkpoint ``ckpt/`` and a generation folder ``fp/`` (1
    prompt, no video). Tests copy what they tamper with; nothing here may be changed."""
    from click.testing import CliRunner

    from sensq.cli import main

    folder = tmp_path_factory.mktemp("workspace")
    runner = CliRunner()
    for args in (["probe", "--limit", "2", "--steps", "3", "--out", str(folder / "probe.h5")],
                 ["rank", str(folder / "probe.h5"), "--out", str(folder / "ranking.json")],
                 ["plan", str(folder / "ranking.json"), "--budget", "70%", "--out", str(folder / "plan.json")],
                 ["apply-plan", str(folder / "plan.json"), "--out", str(folder / "ckpt")],
                 ["generate", "--limit", "1", "--steps", "3", "--no-video", "--out", str(folder / "fp")]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, (args, result.output)
    return folder
