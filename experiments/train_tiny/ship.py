"""Copy a trained pipeline into sensq/models/weights/<name>, storing the experts' weights in bfloat16
(half the bytes; the shipped model is what every number in the README was measured on).

    python experiments/train_tiny/ship.py /tmp/tiny-trained/pipeline tiny-trained
"""

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = Path(__file__).resolve().parents[2] / "sensq" / "models" / "weights"


def main(source: str, name: str) -> None:
    target = WEIGHTS / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    for expert in ("transformer", "transformer_2"):
        for path in (target / expert).glob("*.safetensors"):
            tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(path).items()}
            save_file(tensors, str(path), metadata={"format": "pt"})
    print(f"{target}: {sum(p.stat().st_size for p in target.rglob('*') if p.is_file()) / 1e6:.2f} MB")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
