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
