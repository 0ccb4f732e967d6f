"""Choose the protected set on end-to-end error, with the layers' interactions: rounds of grad-e2e re-linearized
at the quantized model's own operating point.

Walking a leave-one-in ranking adds up each layer's damage as if it were alone. With everything not yet
protected in W4A4 the final latents are off by ``e``; protecting layer ``l`` moves them by about
``-J dY_l`` (``J`` and ``dY_l`` taken at this operating point, through the other quantized layers), so the
error falls by about ``2 e . J dY_l - ||J dY_l||^2``. The first term is exact from one backward pass with
``e`` itself (errors that cancel or compound between layers are in it); the second is grad-e2e's random
projections. Each round measures ``e`` end to end (the forward of the quantized trajectory), protects the
layers with the largest predicted gain per parameter within its share of the budget, and the next round
re-linearizes where that left the model.

Cost: ``rounds x prompts x (1 + 2 (projections + 1))`` generations, plus one forward per prompt for the
full-precision references and one pass to measure the final set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sensq.formats import FormatSpec
from sensq.plan import model_layers
from sensq.sensitivity.e2e import E2EJob, final_latents
from sensq.sensitivity.propagated import linearize, quantize_twins
from sensq.trajectory import apply_trajectory


@dataclass
class SearchResult:
    """``chosen``: per expert, ``(layer, why)`` in the order protected; ``rounds``: per round, the measured
    final-latent NMSE of the set it started from and the layers it protected; ``final``: the chosen set's
    measured NMSE; ``generations``: what the search ran."""

    chosen: dict[str, list[tuple[str, str]]]
    rounds: list[dict]
    final: float
    generations: int


def _pick(gains: dict[str, float], sizes: dict[str, int], remaining: float, share: float) -> list[str]:
    """One round's layers: by predicted gain per parameter within ``share``; but when the layer with the largest
    gain that fits what is ``remaining`` of the budget gains more than that whole fill, it goes first and the
    fill continues within the share left (a greedy by density alone never takes a large layer whose gain
    exceeds everything small: the knapsack's classic failure)."""
    useful = {name: gain for name, gain in gains.items() if gain > 0}

    def fill(limit: float, taken: list[str]) -> list[str]:
        used = sum(sizes[name] for name in taken)
        for name in sorted(useful, key=lambda n: -useful[n] / sizes[n]):
            if name not in taken and used + sizes[name] <= limit:
                taken.append(name)
                used += sizes[name]
        return taken

    by_density = fill(share, [])
    fitting = [name for name in useful if sizes[name] <= remaining]
    if not fitting:
        return by_density
    largest = max(fitting, key=lambda n: useful[n])
    if largest in by_density or useful[largest] <= sum(useful[n] for n in by_density):
        return by_density
    return fill(max(share, sizes[largest]), [largest])


def search_protected(model, job: E2EJob, fmt: FormatSpec, budget: float, *, rounds: int = 4,
                     projections: int = 8, backend: str = "auto", checkpoint: bool = False,
                     progress: Callable[[str, int, int], None] | None = None) -> SearchResult:
    """Protect, per expert, layers within ``budget`` of its parameters (see the module docstring).

    ``checkpoint`` bounds the memory of each linearization as in :func:`linearize`."""
    family, pipe = model.family, model.pipe
    experts = {e: family.expert_module(pipe, e) for e in family.experts(pipe)}
    infos = model_layers(model)
    params = {(i.expert, i.name): i.params for i in infos}
    totals = {e: sum(i.params for i in infos if i.expert == e) for e in experts}
    apply_trajectory(pipe, job.trajectory)
    references = final_latents(pipe, job)
    chosen: dict[str, list[tuple[str, str]]] = {e: [] for e in experts}
    used = dict.fromkeys(experts, 0)
    history = []
    twins = quantize_twins(experts, fmt, backend)
    per_prompt = 1 + 2 * (projections + 1)
    for round_index in range(rounds):
        protected = {(e, name) for e, names in chosen.items() for name, _ in names}
        quantized = frozenset(key for key in params if key not in protected)
        point = linearize(pipe, experts, job, fmt, family=family, projections=projections, backend=backend,
                          seed=round_index * 7919, quantized=quantized, references=references, twins=twins,
                          checkpoint=checkpoint,
                          progress=None if progress is None else
                          (lambda i, n, r=round_index: progress(f"search round {r + 1}/{rounds}", i, n)))
        added = {}
        for expert in experts:
            remaining = budget * totals[expert] - used[expert]
            gains = {name: 2 * point.exact[expert][name] - point.scores[expert][name][0]
                     for name in point.scores[expert]}
            picked = _pick(gains, {name: params[(expert, name)] for name in gains}, remaining,
                           remaining / (rounds - round_index))
            for name in picked:
                chosen[expert].append((name, f"e2e search round {round_index + 1}: predicted gain "
                                             f"{gains[name]:.3g}"))
            used[expert] += sum(params[(expert, name)] for name in picked)
            added[expert] = picked
        history.append({"round": round_index + 1, "measured_nmse": point.error, "protected": added})
    protected = {(e, name) for e, names in chosen.items() for name, _ in names}
    final = linearize(pipe, experts, job, fmt, family=family, projections=0, backend=backend,
                      quantized=frozenset(key for key in params if key not in protected), references=references,
                      twins=twins)
    generations = len(job.prompts) * (1 + rounds * per_prompt + 3)
    return SearchResult(chosen, history, final.error, generations)
