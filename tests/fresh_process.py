"""A checkpoint loaded in a fresh Python process must generate exactly the latents of the in-memory model."""

import subprocess
import sys

import torch


def latents_in_a_fresh_process(checkpoint, trajectory, expected: torch.Tensor, tmp_path, prompt: str,
                               seed: int) -> subprocess.CompletedProcess:
    """Load ``checkpoint`` in a new interpreter, run ``prompt`` along ``trajectory`` with ``seed``; the process
    exits 0 when its latents equal ``expected`` bit for bit (3 otherwise)."""
    torch.save(expected, tmp_path / "expected.pt")
    code = (
        "import torch, sys\n"
        "from sensq.loading import load_model\n"
        "from sensq.trajectory import Trajectory, apply_trajectory, run\n"
        f"model = load_model({str(checkpoint)!r}, torch.device('cpu'), torch.float32)\n"
        f"trajectory = Trajectory.from_dict({trajectory.to_dict()!r})\n"
        "apply_trajectory(model.pipe, trajectory)\n"
        f"got = run(model.pipe, {prompt!r}, trajectory, seed={seed})\n"
        f"sys.exit(0 if torch.equal(got, torch.load({str(tmp_path / 'expected.pt')!r})) else 3)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
