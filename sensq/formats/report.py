"""Data behind ``sensq formats``: one row per format, and an optional SQNR measurement."""

from __future__ import annotations

import torch

from sensq.formats.api import quantize_dequantize
from sensq.formats.spec import FormatSpec, get_format
from sensq.metrics import sqnr_db

FORMAT_TABLE_DIM = 5120
"""K used for the bits/element of per-channel formats in the table (Wan2.2-A14B's hidden size)."""


def format_rows(specs: list[FormatSpec]) -> list[dict]:
    """JSON-ready rows: the spec's fields plus ``bits_per_element`` (at K=5120 for per-channel)."""
    rows = []
    for spec in specs:
        row = spec.to_dict()
        row["bits_per_element"] = spec.bits_per_element(FORMAT_TABLE_DIM)
        rows.append(row)
    return rows


def measure_formats(names: list[str], seed: int = 0) -> list[dict]:
    """SQNR (dB) of each format on seeded tensors shaped like a Linear's operands.

    Weights: Gaussian ``[512, 5120]``. Activations: Student-t (df=4) ``[1024, 5120]`` with one
    channel scaled by 50 (the outlier channels of DiT activations). Both grouped along K.
    """
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(512, FORMAT_TABLE_DIM, generator=generator)
    chi2 = torch.randn(1024, FORMAT_TABLE_DIM, 4, generator=generator).pow(2).mean(-1)
    activation = torch.randn(1024, FORMAT_TABLE_DIM, generator=generator) / chi2.sqrt()
    activation[:, 7] *= 50
    out = []
    for name in names:
        spec = get_format(name)
        out.append({
            "sqnr_weight_db": sqnr_db(weight, quantize_dequantize(weight, spec)),
            "sqnr_activation_db": sqnr_db(activation, quantize_dequantize(activation, spec)),
        })
    return out
