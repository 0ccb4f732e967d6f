"""A plan from a ranking: per expert, the entrance (when asked) and the most sensitive layers within a budget or
the top k, optionally only at some denoising steps; or an explicit set of protected layers."""

from __future__ import annotations

import time

from sensq.errors import InputError
from sensq.formats import get_format
from sensq.models.family import recorded_family
from sensq.models.layers import LayerInfo
from sensq.plan.rules import HIGH_PRECISION_BITS, Plan, Rule, _range, compile_pattern, resolve, summarize  # noqa: F401


def refuse_nan_values(ranking, formats: list[str]) -> None:
    """A plan cannot order layers whose values are NaN (a failed measurement, a damaged ranking).

    Raises:
        InputError: how many layers hold NaN, and the first.
    """
    import math

    for fmt in formats:
        bad = [f"{expert}:{layer.name}" for expert, layers in ranking.experts.items() for layer in layers
               if fmt in layer.value and math.isnan(layer.value[fmt])]
        if bad:
            raise InputError(f"the ranking holds NaN {fmt} values for {len(bad)} layer(s), e.g. {bad[0]}: a plan "
                             "cannot order them; rank again (a NaN usually means a non-finite activation or model)")


def _check_plan_request(ranking, budget, top_k, fmt, act_format, rank_format) -> tuple[str | None, str]:
    """The activation format and the format whose ranking orders the layers; raises InputError on bad options."""
    if (budget is None) == (top_k is None):
        raise InputError("give exactly one of --budget and --top-k")
    if top_k is not None and top_k < 0:
        raise InputError(f"--top-k must be >= 0, got {top_k}")
    get_format(fmt)
    activation = fmt if act_format == "same" else act_format
    if activation is not None:
        get_format(activation)
    if rank_format is None:
        if fmt not in ranking.formats:
            raise InputError(f"the ranking has no {fmt!r} scores (it ranks {', '.join(ranking.formats)}): rank with "
                             f"--format {fmt}, or pass --rank-format to order {fmt} layers by another format's ranking")
        rank_format = fmt  # a plan for format F follows F's own ranking
    if rank_format not in ranking.formats:
        raise InputError(f"the ranking has no {rank_format!r} scores (it has {', '.join(ranking.formats)})")
    return activation, rank_format


def _protected_layers(ordered, expert: str, budget, top_k, protect_entrance: bool, patterns, rank_format: str,
                      metric: str, warnings: list[str]) -> list[tuple[str, str]]:
    """One expert's protected layers with the reason for each: the entrance and --protect patterns, then the
    ranking in order (the top ``top_k``, or each layer that still fits the ``budget`` share)."""
    total = sum(layer.params for layer in ordered)
    chosen: list[tuple[str, str]] = []
    for layer in ordered:
        if protect_entrance and layer.entrance:
            chosen.append((layer.name, "entrance"))
        elif any(p.fullmatch(layer.name) for p in patterns):
            chosen.append((layer.name, "--protect"))
    used = sum(layer.params for layer in ordered if layer.name in dict(chosen))
    if budget is not None and used > budget * total:
        warnings.append(f"{expert}: the entrance and --protect layers alone keep {used / total:.1%} of the "
                        f"parameters in high precision, more than the {budget:.1%} budget")
    picked = 0
    for layer in ordered:
        if layer.name in dict(chosen):
            continue
        if top_k is not None:
            if picked >= top_k:
                break
        elif used + layer.params > budget * total:
            continue
        chosen.append((layer.name, f"rank {layer.rank[rank_format]} by {metric}"))
        used += layer.params
        picked += 1
    return chosen


def _in_steps(ranking, expert: str, fmt: str, steps: tuple[int, int]) -> list:
    """The expert's layers ordered by their per-step values averaged over the denoising steps in ``steps``
    (branches averaged), most sensitive first; [] when none of the expert's steps falls in the range.

    Raises:
        InputError: a ranking without per-step values (e2e rankings score the whole trajectory).
    """
    import numpy as np

    from sensq.metrics import METRICS

    inside = [i for i, step in enumerate(ranking.steps[expert]) if steps[0] <= step <= steps[1]]
    if not inside:
        return []
    layers = ranking.experts[expert]
    if not all(fmt in layer.per_step for layer in layers):
        raise InputError(f"--protect-steps orders layers by their per-step values, which this {ranking.metric} "
                         "ranking does not hold: rank with grad-e2e (the default) or a local metric")
    sign = -1.0 if METRICS[ranking.metric].higher_is_more_sensitive else 1.0

    def score(layer) -> float:
        values = np.asarray(layer.per_step[fmt], dtype=np.float64)[inside].mean(axis=1)
        finite = values[np.isfinite(values)]
        return sign * (float(finite.mean()) if finite.size else np.inf)

    return sorted(layers, key=score)


def entrance_by_default(ranking) -> bool:
    """Whether a budget or top-k plan protects the family's entrance unless told: only for a local ranking.

    Measured (docs/sensitivity.md): local metrics (mse, ...) rank the condition embedders and proj_out near the
    bottom although they do the most end-to-end damage, so their plans need the entrance as a prior; grad-e2e
    and e2e rankings put them first on their own, and forcing ``blocks.0`` on top spends budget on layers the
    data rank low."""
    from sensq.metrics import METRICS

    metric = METRICS.get(ranking.metric)
    return metric is None or metric.local


def build_plan(ranking, *, budget: float | None = None, top_k: int | None = None, protect_entrance: bool | None = None,
               protect: list[str] | None = None, fmt: str = "hif4", act_format: str | None = "same",
               rank_format: str | None = None, protect_steps: tuple[int, int] | None = None) -> Plan:
    """Protect, per expert, the entrance layers (``None``: :func:`entrance_by_default`) and extra patterns, then
    the most sensitive
    layers of the ranking: the top ``top_k``, or while the protected share of the expert's parameters
    stays within ``budget`` (walking the ranking in order and protecting each layer that still fits).
    Everything else gets ``fmt`` for weights and ``act_format`` (default: the same) for activations.

    ``protect_steps=(a, b)``: the protected layers keep high precision at denoising steps a..b only (rules with
    a ``steps`` range; quantized at the other steps), chosen by their sensitivity at those steps (the
    ranking's per-step values); an expert that runs none of those steps protects nothing.

    A block ranking (``sensq rank --metric e2e --granularity block``) is planned block by block: a protected
    block keeps all its layers in high precision (``top_k`` counts blocks).

    Raises:
        InputError: both or neither of ``budget``/``top_k``, a block ranking without its blocks' layers,
            an unknown format, a negative ``top_k``, ``protect_steps`` with a ranking without per-step values.
    """
    activation, rank_format = _check_plan_request(ranking, budget, top_k, fmt, act_format, rank_format)
    refuse_nan_values(ranking, [rank_format])
    if protect_entrance is None:
        protect_entrance = entrance_by_default(ranking)
    patterns = [compile_pattern(p) for p in (protect or [])]
    rules: list[Rule] = []
    infos: list[LayerInfo] = []
    warnings: list[str] = []
    for expert in ranking.experts:
        ordered = ranking.ordered(expert, rank_format)
        if any(layer.members and not layer.member_layers for layer in ordered):
            raise InputError("this block ranking does not record its blocks' layers (made by an older sensq): "
                             "rank again with --granularity block, or rank per layer")
        infos += [LayerInfo(expert, m["name"], m["params"], m["in_features"], m["kind"]) if layer.members else
                  LayerInfo(expert, layer.name, layer.params, layer.in_features, layer.kind)
                  for layer in ordered for m in (layer.member_layers or [None])]
        if protect_steps is not None:
            ordered = _in_steps(ranking, expert, rank_format, protect_steps)
            if not ordered:
                warnings.append(f"{expert}: runs none of steps {protect_steps[0]}-{protect_steps[1]}; nothing "
                                "protected there")
        chosen = _protected_layers(ordered, expert, budget, top_k, protect_entrance, patterns, rank_format,
                                   ranking.metric, warnings)
        if protect_steps is not None:  # say where in the steps' own order each ranked layer stands
            position = {layer.name: i + 1 for i, layer in enumerate(ordered)}
            chosen = [(name, why if not why.startswith("rank ") else
                       f"rank {position[name]} at steps {protect_steps[0]}-{protect_steps[1]} by {ranking.metric}")
                      for name, why in chosen]
        groups = {layer.name: layer.members for layer in ordered if layer.members}
        rules += [Rule(f"{expert}:{member}", None, None, f"{why} (block {name})" if name in groups else why,
                       steps=protect_steps)
                  for name, why in chosen for member in groups.get(name, [name])]
        rules.append(Rule(f"re:{expert}:.*", fmt, activation, "everything else"))
    return ranked_plan(ranking, rules, infos, {
        "ranking_metric": ranking.metric, "ranking_format": rank_format, "reduce": ranking.reduce, "budget": budget,
        "top_k": top_k, "protect_entrance": protect_entrance, "protect": protect or [],
        **({"protect_steps": list(protect_steps)} if protect_steps is not None else {}),
        "probe_sha256": ranking.provenance.get("probe_sha256"), "warnings": warnings})


def plan_protecting(chosen: dict[str, list[tuple[str, str]]], layers: list[LayerInfo], fmt: str, *, model: dict,
                    source: dict) -> Plan:
    """A plan that keeps ``chosen`` (per expert, ``(layer, why)``) in high precision and puts every other layer
    of those experts in ``fmt`` (W=A), with its resolved table and summary."""
    rules = [Rule(f"{expert}:{name}", None, None, why) for expert, names in chosen.items() for name, why in names]
    rules += [Rule(f"re:{expert}:.*", fmt, fmt, "everything else") for expert in chosen]
    table, _ = resolve(rules, layers)
    return Plan(rules=rules, layers=table, summary=summarize(table, layers), model=model,
                source={**source, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def ranked_plan(ranking, rules: list[Rule], infos: list[LayerInfo], source: dict) -> Plan:
    """A plan of ``rules`` made from ``ranking``: resolved against ``infos``, summarized, with the ranking's model
    and ``source`` (plus when it was made)."""
    table, _ = resolve(rules, infos)
    provenance = ranking.provenance
    return Plan(rules=rules, layers=table, summary=summarize(table, infos),
                model={"id": provenance.get("model_id"), "fingerprint": provenance.get("model_fingerprint"),
                       "loras": provenance.get("loras") or {},
                       "family": recorded_family(provenance.get("family")).name},
                source={**source, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
