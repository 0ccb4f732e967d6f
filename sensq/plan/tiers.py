"""Precision tiers under a bits budget: give every layer one of several formats (e.g. HiF4 W4A4, FP8 W8A8,
BF16), per expert, so that the predicted error is smallest at a given effective bits per weight.

The predicted error of a layer in a format is the ranking's value for that format (a ranking made with
``--format hif4,fp8_e4m3``; BF16 costs 16 bits and predicts 0). Errors are taken as additive over layers,
the usual first-order assumption of mixed-precision search (HAWQ, ...), which ``sensq ablate`` then checks
end to end. The choice is a multiple-choice knapsack per expert:

    minimize    sum_l sum_t x[l,t] * error[l,t]
    subject to  sum_t x[l,t] = 1 for every layer,  sum_l sum_t x[l,t] * params[l] * bits[l,t] <= B * sum_l params[l]

``exact`` solves it as an integer program (scipy's HiGHS ``milp``: seconds for a few hundred layers x three
tiers); ``greedy`` starts every layer at its cheapest tier and repeatedly takes the upgrade with the most
error removed per added bit (a lower-convex-hull walk), stopping when the next one would not fit. Both
respect the budget; ``exact`` is optimal for the predicted errors, ``greedy`` is what large models may
need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sensq.errors import InputError
from sensq.formats import get_format
from sensq.metrics import METRICS
from sensq.plan import HIGH_PRECISION_BITS, Rule, compile_pattern

HIGH_PRECISION = "bf16"
SEARCHES = ("exact", "greedy")


@dataclass(frozen=True)
class Allocation:
    """One expert's choice: ``formats[layer]`` (None = high precision), with its predicted error and bits."""

    formats: dict[str, str | None]
    predicted_error: float
    effective_bits: float


def parse_tiers(text: str) -> list[str | None]:
    """``hif4,fp8_e4m3,bf16`` -> ``["hif4", "fp8_e4m3", None]`` (``bf16`` = high precision).

    Raises:
        InputError: fewer than two tiers, a repeated or unknown format.
    """
    names = [t.strip() for t in text.split(",") if t.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise InputError(f"--tiers needs at least two different formats, e.g. hif4,fp8_e4m3,bf16; got {text!r}")
    tiers = []
    for name in names:
        if name == HIGH_PRECISION:
            tiers.append(None)
        else:
            tiers.append(get_format(name).identity)
    return tiers


def _bits(tier: str | None, in_features: int) -> float:
    return float(HIGH_PRECISION_BITS) if tier is None else get_format(tier).bits_per_element(in_features)


def _costs(layers, tiers: list[str | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(params [L], bits [L, T], error [L, T]) for one expert's ranked layers."""
    params = np.array([layer.params for layer in layers], dtype=np.float64)
    bits = np.array([[_bits(t, layer.in_features) for t in tiers] for layer in layers])
    error = np.array([[0.0 if t is None else layer.value[t] for t in tiers] for layer in layers], dtype=np.float64)
    return params, bits, error


def allocate(layers, tiers: list[str | None], budget_bits: float, search: str = "exact",
             forced: dict[str, str | None] | None = None) -> Allocation:
    """The tier of every layer of one expert within ``budget_bits`` effective bits per weight.

    Args:
        layers: the expert's ``LayerRank`` rows; each holds a value for every quantized tier.
        forced: layer -> tier decided beforehand (the entrance, ``--protect``): kept, and counted in the budget.

    Raises:
        InputError: an unknown search, a non-finite predicted error, a budget below what the cheapest tiers
            (and the forced layers) already need.
    """
    if search not in SEARCHES:
        raise InputError(f"unknown search {search!r}; use one of {', '.join(SEARCHES)}")
    forced = forced or {}
    params, bits, error = _costs(layers, tiers)
    if not np.isfinite(error).all():
        bad = next(layer.name for layer, row in zip(layers, error, strict=True) if not np.isfinite(row).all())
        raise InputError(f"layer {bad!r} has a non-finite predicted error; rank it again or leave its tier out")
    allowed = np.ones_like(error, dtype=bool)
    for i, layer in enumerate(layers):
        if layer.name in forced:
            allowed[i] = [t == forced[layer.name] for t in tiers]
    ceiling = bits.max()
    if not math.isfinite(budget_bits) or budget_bits > ceiling:
        raise InputError(f"--bits must be a number of bits per weight up to {ceiling:g} (every layer in the most "
                         f"precise tier), got {budget_bits:g}")
    capacity = budget_bits * params.sum()
    floor = (params * np.where(allowed, bits, np.inf).min(axis=1)).sum()
    if floor > capacity * (1 + 1e-12):
        raise InputError(f"--bits {budget_bits:g} is below the {floor / params.sum():.3f} bits per weight that the "
                         "cheapest tiers (and the forced layers) already need")
    choice = _exact(params, bits, error, allowed, capacity) if search == "exact" else \
        _greedy(params, bits, error, allowed, capacity)
    rows = np.arange(len(layers))
    return Allocation(
        formats={layer.name: tiers[t] for layer, t in zip(layers, choice, strict=True)},
        predicted_error=float(error[rows, choice].sum()),
        effective_bits=float((params * bits[rows, choice]).sum() / params.sum()),
    )


def _exact(params, bits, error, allowed, capacity) -> np.ndarray:
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_layers, n_tiers = error.shape
    one_each = np.kron(np.eye(n_layers), np.ones(n_tiers))
    weight = (params[:, None] * bits).reshape(1, -1) / params.sum()  # in bits per weight: well scaled
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(weight, -np.inf, capacity / params.sum())]
    result = milp(error.reshape(-1), constraints=constraints, integrality=np.ones(error.size),
                  bounds=Bounds(0, allowed.reshape(-1).astype(float)))
    if not result.success:
        raise InputError(f"the exact search found no allocation ({result.message}); try --search greedy")
    return np.round(result.x).reshape(n_layers, n_tiers).argmax(axis=1)


def _greedy(params, bits, error, allowed, capacity) -> np.ndarray:
    cost = params[:, None] * bits
    cost = np.where(allowed, cost, np.inf)
    choice = cost.argmin(axis=1)
    used = cost[np.arange(len(choice)), choice].sum()
    while True:
        rows = np.arange(len(choice))
        extra = cost - cost[rows, choice][:, None]
        gain = error[rows, choice][:, None] - error
        useful = np.isfinite(extra) & (extra > 0) & (gain > 0) & (used + extra <= capacity * (1 + 1e-12))
        if not useful.any():
            return choice
        ratio = np.where(useful, gain / np.where(extra > 0, extra, 1), -np.inf)
        layer, tier = np.unravel_index(np.argmax(ratio), ratio.shape)
        used += extra[layer, tier]
        choice[layer] = tier


def pareto(layers, tiers: list[str | None], search: str = "exact", forced=None, points: int = 12) -> list[dict]:
    """The front of predicted error against effective bits: the allocation at ``points`` budgets from the
    cheapest possible to all high precision."""
    params, bits, _ = _costs(layers, tiers)
    low = (params * bits.min(axis=1)).sum() / params.sum()
    front = []
    for budget in np.linspace(low, float(HIGH_PRECISION_BITS), points):
        try:
            found = allocate(layers, tiers, float(budget), search, forced)
        except InputError:
            continue  # below what the forced layers need
        front.append({"budget_bits": float(budget), "effective_bits": found.effective_bits,
                      "predicted_error": found.predicted_error})
    return front


def build_tier_plan(ranking, tiers: list[str | None], budget_bits: float, *, search: str = "exact",
                    protect_entrance: bool = False, protect: list[str] | None = None, with_pareto: bool = False):
    """A plan giving each layer a tier, per expert within ``budget_bits`` (see the module docstring). Layers in
    a quantized tier get that format for weights and activations (W4A4, W8A8); ``bf16`` keeps both in high
    precision. ``protect_entrance`` and ``protect`` force those layers to high precision first.

    Raises:
        InputError: a tier the ranking has no values for, a quality metric (SQNR: the errors must add), a
            ranking of blocks, and what :func:`allocate` raises.
    """
    from sensq.plan import LayerInfo, refuse_nan_values
    from sensq.plan.build import ranked_plan

    if not METRICS[ranking.metric].higher_is_more_sensitive:
        raise InputError(f"--tiers adds predicted errors over layers; a {ranking.metric} ranking is a quality, "
                         "not an error: rank with --metric mse (or e2e)")
    missing = [t for t in tiers if t is not None and t not in ranking.formats]
    if missing:
        raise InputError(f"the ranking has no {missing[0]!r} values (it ranks {', '.join(ranking.formats)}): rank "
                         f"with --format {','.join(t for t in tiers if t is not None)}")
    refuse_nan_values(ranking, [t for t in tiers if t is not None])
    patterns = [compile_pattern(p) for p in (protect or [])]
    rules, infos, front = [], [], {}
    for expert, layers in ranking.experts.items():
        if any(layer.members for layer in layers):
            raise InputError("this ranking scores whole blocks (--granularity block); tier plans need a per-layer "
                             "ranking")
        infos += [LayerInfo(expert, layer.name, layer.params, layer.in_features, layer.kind) for layer in layers]
        forced = {layer.name: None for layer in layers
                  if (protect_entrance and layer.entrance) or any(p.fullmatch(layer.name) for p in patterns)}
        found = allocate(layers, tiers, budget_bits, search, forced)
        for layer in layers:
            tier = found.formats[layer.name]
            why = ("forced high precision" if layer.name in forced else
                   f"tier {tier or HIGH_PRECISION} ({search} search, predicted "
                   f"{0.0 if tier is None else layer.value[tier]:.3g})")
            rules.append(Rule(f"{expert}:{layer.name}", tier, tier, why))
        if with_pareto:
            front[expert] = {"front": pareto(layers, tiers, search, forced),
                             "chosen": {"effective_bits": found.effective_bits,
                                        "predicted_error": found.predicted_error}}
    return ranked_plan(ranking, rules, infos, {
        "ranking_metric": ranking.metric, "tiers": [t or HIGH_PRECISION for t in tiers], "budget_bits": budget_bits,
        "search": search, "protect_entrance": protect_entrance, "protect": protect or [],
        "probe_sha256": ranking.provenance.get("probe_sha256"), **({"pareto": front} if with_pareto else {})})
