"""An ablation's statistics: per-set means with bootstrap intervals, every pair of sets compared paired by
generation, and the headline (sensq's best ranked set, its cost, and its gain over no protection and over the
best fixed set that costs no more bits). :mod:`sensq.report.ablation` renders them."""

from __future__ import annotations

import math
from pathlib import Path

from sensq.ablate.sets import SetKind
from sensq.stats import bootstrap_mean, paired_difference
from sensq.store.files import read_json

ABLATION_SCHEMA = "sensq.ablation/1"
METRICS = ("latent_nmse", "psnr", "ssim", "first_frame_nmse", "temporal_nmse")


def aggregate(per_item: dict[str, dict[str, float]]) -> dict:
    """Per-metric mean, bootstrap interval and worst case over the generations, plus the values themselves
    (paired comparisons need them)."""
    keys = sorted({k for values in per_item.values() for k in values})
    metrics, intervals, worst = {}, {}, {}
    for key in keys:
        values = [values[key] for values in per_item.values() if key in values]
        interval = bootstrap_mean(values)
        metrics[key], intervals[key] = interval.mean, interval.to_dict()
        worst[key] = float(max(values) if key.endswith("nmse") else min(values))
    return {"metrics": metrics, "intervals": intervals, "worst": worst, "per_item": per_item}


def paired(row_a: dict, row_b: dict, metric: str):
    items = sorted(set(row_a["per_item"]) & set(row_b["per_item"]))
    a = [row_a["per_item"][i].get(metric, math.nan) for i in items]
    b = [row_b["per_item"][i].get(metric, math.nan) for i in items]
    try:
        return paired_difference(a, b)
    except ValueError:
        return None


def compare_rows(rows: list[dict], reference_row: dict | None = None) -> list[dict]:
    """Every pair of sets, paired by generation, for latent NMSE (and the procedural score): the mean
    difference (first minus second), its 95% interval, and whether it is distinguishable from noise."""
    comparisons = []
    metrics = ("latent_nmse", "procedural")
    for i, a in enumerate(rows):
        for b in rows[i + 1:] + ([reference_row] if reference_row else []):
            for metric in metrics:
                if metric not in a["metrics"] or metric not in b["metrics"]:
                    continue
                interval = paired(a, b, metric)
                if interval is None:
                    continue
                comparisons.append({"a": a["set"], "b": b["set"], "metric": metric, **interval.to_dict(),
                                    "significant": interval.excludes_zero})
    return comparisons


FIXED_SETS = ("entrance", "ModelOpt Wan recipe")
"""The names fixed sets had before rows recorded their kind (read by :func:`_kind` for old ablations only)."""
BITS_SLACK = 0.01


def headline(result: dict) -> dict:
    """The recommendation a reader needs first: sensq's best ranked set (budget or top-k), its cost, and its
    gain over no protection and over the best fixed set that costs no more bits, with intervals."""
    rows = result["rows"]
    ranked = [r for r in rows if _kind(r) is SetKind.RANKED]
    if not ranked:
        return {}
    best = min(ranked, key=lambda r: (r["metrics"]["latent_nmse"], r["effective_bits"]))
    out = {"set": best["set"], "protected_layers": best["protected_layers"],
           "protected_share": best["protected_share"], "effective_bits": best["effective_bits"],
           "weight_gb": best["weight_bytes"] / 1e9, "weight_gb_bf16": best["weight_bytes_bf16"] / 1e9,
           "real_size": best["real_size"], "latent_nmse": best["intervals"]["latent_nmse"]}
    none = next((r for r in rows if r["set"] == "none"), None)
    if none is not None:
        gain = paired(none, best, "latent_nmse")
        out["gain_over_none"] = gain.to_dict() | {"significant": gain.excludes_zero} if gain else None
    # "equal budget" with 1% slack: a budget walk cannot hit a fixed set's share exactly (8.22 vs 8.24 bits)
    fixed = _fixed_within(rows, best["effective_bits"])
    if fixed:
        rival = min(fixed, key=lambda r: r["metrics"]["latent_nmse"])
        gain = paired(rival, best, "latent_nmse")
        out["best_fixed_set"] = rival["set"]
        out["gain_over_best_fixed"] = gain.to_dict() | {"significant": gain.excludes_zero} if gain else None
    out["per_budget"] = _per_budget(rows)
    return out


def _fixed_within(rows: list[dict], bits: float) -> list[dict]:
    """The fixed sets that cost no more than ``bits`` (with :data:`BITS_SLACK`)."""
    return [r for r in rows if _kind(r) is SetKind.FIXED and r["effective_bits"] <= bits * (1 + BITS_SLACK)]


def _kind(row: dict) -> SetKind:
    """A row's set kind; ablations written before kinds were recorded: read from the set's name, as the sets
    were named then."""
    if "kind" in row:
        return SetKind(row["kind"])
    name = row["set"]
    if name == "none":
        return SetKind.NONE
    if name.startswith(("budget", "entrance + top", "sensq at")):
        return SetKind.RANKED
    if name in FIXED_SETS or name.startswith("entrance, "):
        return SetKind.FIXED
    return SetKind.RANDOM if name.startswith("random") else SetKind.PLAN


def _per_budget(rows: list[dict]) -> list[dict]:
    """For each ranked set: the best fixed set that costs no more bits, and whether the ranked set beats it
    beyond noise (``won``: ranked, ``lost``: the fixed set, ``tie``: within noise)."""
    out = []
    for row in (r for r in rows if _kind(r) is SetKind.RANKED):
        fixed = _fixed_within(rows, row["effective_bits"])
        if not fixed:
            continue
        rival = min(fixed, key=lambda r: r["metrics"]["latent_nmse"])
        gain = paired(rival, row, "latent_nmse")
        verdict = "tie" if gain is None or not gain.excludes_zero else ("won" if gain.mean > 0 else "lost")
        out.append({"set": row["set"], "fixed": rival["set"], "verdict": verdict,
                    "gain": gain.to_dict() if gain else None})
    return out


def load_ablation(folder: str | Path) -> dict:
    return read_json(Path(folder) / "ablation.json", ABLATION_SCHEMA, "ablation")
