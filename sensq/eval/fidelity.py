"""Fidelity of a quantized generation against the full-precision one with the same prompt and seed.

Offline, exact, no weights. One definition each:

* ``latent_nmse``: NMSE of the final latents (before the VAE).
* ``psnr`` per frame (dB, peak 1.0) and its mean; ``ssim`` per frame (Gaussian window 11, sigma 1.5,
  on luma, constants of Wang et al. 2004) and its mean.
* ``first_frame_nmse``: NMSE of frame 0 (VBench's subject consistency leans on the first frame).
* ``temporal_nmse``: NMSE of the frame-to-frame differences (motion error, independent of a constant
  per-frame offset).

Frames are float arrays ``[frames, height, width, 3]`` in [0, 1].
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from sensq.metrics import nmse


def psnr(reference: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """Per-frame PSNR in dB with peak 1.0 (``inf`` for identical frames)."""
    mse = ((reference.astype(np.float64) - frames.astype(np.float64)) ** 2).reshape(len(frames), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return np.where(mse == 0, math.inf, 10.0 * np.log10(1.0 / np.maximum(mse, 1e-300)))


def _luma(frames: np.ndarray) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    return (torch.from_numpy(frames.astype(np.float64)) * weights).sum(-1).unsqueeze(1)  # [F, 1, H, W]


def ssim(reference: np.ndarray, frames: np.ndarray, window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Per-frame SSIM on luma (1.0 for identical frames); the window shrinks to fit small frames."""
    x, y = _luma(reference), _luma(frames)
    size = min(window, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2  # odd
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    gauss = torch.exp(-(coords**2) / (2 * sigma**2))
    gauss /= gauss.sum()
    kernel = (gauss[:, None] * gauss[None, :]).expand(1, 1, size, size)

    def blur(t):
        return F.conv2d(t, kernel)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return value.mean(dim=(1, 2, 3)).numpy()


def fidelity(reference_frames: np.ndarray, frames: np.ndarray, reference_latents: torch.Tensor | None = None,
             latents: torch.Tensor | None = None) -> dict[str, float]:
    """All fidelity numbers of one generation against its full-precision twin."""
    if reference_frames.shape != frames.shape:
        raise ValueError(f"frame shapes differ: {reference_frames.shape} vs {frames.shape}")
    ref_t, t = torch.from_numpy(reference_frames.astype(np.float64)), torch.from_numpy(frames.astype(np.float64))
    per_psnr = psnr(reference_frames, frames)
    finite = per_psnr[np.isfinite(per_psnr)]
    out = {
        "psnr": float(finite.mean()) if finite.size else math.inf,
        "psnr_min": float(per_psnr.min()),
        "ssim": float(ssim(reference_frames, frames).mean()),
        "first_frame_nmse": nmse(ref_t[0], t[0]),
        "temporal_nmse": nmse(ref_t[1:] - ref_t[:-1], t[1:] - t[:-1]) if len(frames) > 1 else 0.0,
    }
    if reference_latents is not None and latents is not None:
        out["latent_nmse"] = nmse(reference_latents.float(), latents.float())
    return out
