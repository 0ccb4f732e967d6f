"""The protected sets an ablation compares: what kind each is, and the standard ones built from a ranking (none,
the entrance, sensq's ranked plans, the family's published recipe, the first and last blocks, random draws),
plus plan files as sets."""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sensq.errors import InputError
from sensq.plan import Plan, Rule, build_plan, model_layers, summarize, validate_plan


class SetKind(str, enum.Enum):
    """What a protected set is: no protection; chosen from a ranking by sensq; a rule a user writes without sensq
    (the entrance, a published recipe, the first and last blocks); a random draw; a plan file from elsewhere.
    The value is what ``ablation.json`` records per row."""

    NONE = "none"
    RANKED = "ranked"
    FIXED = "fixed"
    RANDOM = "random"
    PLAN = "plan"


SET_KINDS = tuple(kind.value for kind in SetKind)


@dataclass(frozen=True)
class ProtectedSet:
    name: str
    plan: Plan
    kind: SetKind = SetKind.RANKED

    def __post_init__(self):
        try:
            object.__setattr__(self, "kind", SetKind(self.kind))
        except ValueError:
            raise ValueError(f"unknown set kind {self.kind!r}; use one of {', '.join(SET_KINDS)}") from None


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def quantize_the_rest(experts: list[str], fmt: str) -> list[Rule]:
    """The last rules of every set: each expert's remaining layers in ``fmt`` (W=A)."""
    return [Rule(f"re:{e}:.*", fmt, fmt) for e in experts]


@dataclass(frozen=True)
class SetContext:
    """What a :class:`SetBuilder` builds its sets from: the model, the ranking, the format of the quantized
    layers, the ablation's top-k values, budgets (shares of parameters) and random draws, and whether sensq's
    plans put the entrance first (``None``: as ``sensq plan`` decides for the ranking)."""

    model: object
    ranking: dict
    fmt: str = "hif4"
    top_ks: tuple[int, ...] = (2, 4)
    budgets: tuple[float, ...] = (0.3,)
    random_draws: int = 0
    protect_entrance: bool | None = None

    @property
    def experts(self) -> list[str]:
        return self.model.family.experts(self.model.pipe)

    @property
    def n_blocks(self) -> int:
        family = self.model.family
        return len(family.block_list(family.expert_module(self.model.pipe, self.experts[0])))

    def with_the_rest(self, rules: list[Rule]) -> Plan:
        """``rules`` followed by every other layer of each expert in :attr:`fmt`."""
        return Plan(list(rules) + quantize_the_rest(self.experts, self.fmt))

    def ranked(self, **choice) -> Plan:
        """sensq's plan from the ranking, as ``sensq plan`` makes it (``budget=`` or ``top_k=``)."""
        choice.setdefault("protect_entrance", self.protect_entrance)
        return build_plan(self.ranking, fmt=self.fmt, **choice)


@dataclass(frozen=True)
class SetBuilder:
    """One kind of protected set an ablation can compare: ``build`` turns a :class:`SetContext` into sets (each
    with its :class:`SetKind`; none where the rule does not apply to the model). Registered with
    :func:`register_set_builder`; ``sensq ablate --sets`` names them."""

    name: str
    build: Callable[[SetContext], list[ProtectedSet]]
    help: str


_BUILDERS: dict[str, SetBuilder] = {}


def register_set_builder(builder: SetBuilder) -> SetBuilder:
    """Add a kind of protected set; the standard sets are every registered builder's, in registration order.

    Raises:
        ValueError: the name is taken by another builder.
    """
    if builder.name in _BUILDERS and _BUILDERS[builder.name] != builder:
        raise ValueError(f"set builder {builder.name!r} is already registered")
    _BUILDERS[builder.name] = builder
    return builder


def unregister_set_builder(name: str) -> None:
    """Remove a builder added by :func:`register_set_builder` (tests)."""
    _BUILDERS.pop(name, None)


def set_builders() -> dict[str, SetBuilder]:
    """The registered builders by name, in registration order."""
    return dict(_BUILDERS)


def check_set_kinds(names) -> None:
    """Raises InputError naming the first of ``names`` that no builder has, and the known ones."""
    unknown = [name for name in names if name not in _BUILDERS]
    if unknown:
        raise InputError(f"unknown set kind {unknown[0]!r}; known: {', '.join(_BUILDERS)}")


def standard_sets(model, ranking, fmt: str = "hif4", top_ks=(2, 4), budgets=(0.3,), random_draws: int = 0,
                  protect_entrance: bool | None = None, builders: list[str] | None = None) -> list[ProtectedSet]:
    """The sets of every registered builder (or of ``builders``, by name), in registration order: none; the
    entrance; entrance + top-k (per k); sensq's budgeted plans; the entrance in one expert only; the family's
    published fixed set where it has one (Wan: ModelOpt's, the embedders, proj_out, the first and last three
    blocks) and sensq's plan at the same budget, left out for models of 6 blocks or fewer (the set would keep
    every block in high precision); the first and last blocks per budget; and ``random_draws`` random sets per
    budget with the same share of parameters protected (seeded draws, the yardstick a ranking has to beat).
    sensq's plans are made as ``sensq plan`` makes them, with ``protect_entrance`` as given (the entrance
    first, then the ranking; or the ranking alone; ``None``: as ``sensq plan`` decides for this ranking).

    Raises:
        InputError: an unknown builder name.
    """
    check_set_kinds(builders or ())
    context = SetContext(model, ranking, fmt, tuple(top_ks), tuple(budgets), random_draws, protect_entrance)
    return [protected for name, builder in _BUILDERS.items() if builders is None or name in builders
            for protected in builder.build(context)]


def _none(c: SetContext) -> list[ProtectedSet]:
    return [ProtectedSet("none", c.with_the_rest([]), SetKind.NONE)]


def _entrance(c: SetContext) -> list[ProtectedSet]:
    return [ProtectedSet("entrance", c.with_the_rest([Rule(c.model.family.entrance_rule(c.experts), None, None)]),
                         SetKind.FIXED)]


def _top_k(c: SetContext) -> list[ProtectedSet]:
    return [ProtectedSet(f"entrance + top-{k}", c.ranked(top_k=k, protect_entrance=True)) for k in c.top_ks]


def _budget(c: SetContext) -> list[ProtectedSet]:
    return [ProtectedSet(f"budget {budget:.0%}", c.ranked(budget=budget)) for budget in c.budgets]


def _entrance_per_expert(c: SetContext) -> list[ProtectedSet]:
    return [ProtectedSet(f"entrance, {expert} only",
                         c.with_the_rest([Rule(c.model.family.entrance_rule([expert]), None, None)]), SetKind.FIXED)
            for expert in (c.experts if len(c.experts) > 1 else [])]


def _recipe(c: SetContext) -> list[ProtectedSet]:
    recipe = c.model.family.fixed_recipe(c.n_blocks)
    if c.n_blocks <= 6 or recipe is None:
        return []
    recipe_name, pattern = recipe
    fixed = c.with_the_rest([Rule(f"re:({'|'.join(c.experts)}):{pattern}", None, None)])
    layers = model_layers(c.model)
    share = summarize(validate_plan(fixed, layers), layers)["total"]["protected_share"]
    return [ProtectedSet(recipe_name, fixed, SetKind.FIXED),
            ProtectedSet(f"sensq at ModelOpt's budget ({share:.0%})", c.ranked(budget=share))]


def _edge_blocks(c: SetContext) -> list[ProtectedSet]:
    sets = []
    for budget in c.budgets if c.n_blocks > 2 else ():
        edges = edge_blocks_plan(c.model, c.experts, budget, c.fmt)
        if any(rule.weight is None for rule in edges.rules):  # left out where no whole block fits the budget
            sets.append(ProtectedSet(f"first+last blocks {budget:.0%}", edges, SetKind.FIXED))
    return sets


def _random(c: SetContext) -> list[ProtectedSet]:
    return [ProtectedSet(f"random {budget:.0%} #{draw + 1}", random_plan(c.model, c.experts, budget, c.fmt, seed=draw),
                         SetKind.RANDOM) for budget in c.budgets for draw in range(c.random_draws)]


for _builder in (
    SetBuilder("none", _none, "every layer quantized: the yardstick"),
    SetBuilder("entrance", _entrance, "the family's entrance layers kept (Wan: patch_embedding, condition_embedder, "
               "blocks.0), both experts"),
    SetBuilder("top-k", _top_k, "the entrance + the ranking's top k layers per expert (--top-k)"),
    SetBuilder("budget", _budget, "sensq's plan at each --budget, as sensq plan makes it"),
    SetBuilder("entrance-per-expert", _entrance_per_expert, "the entrance kept in one expert only (two experts)"),
    SetBuilder("recipe", _recipe, "the family's published fixed set (Wan: ModelOpt's) and sensq's plan at its "
               "budget (models of more than 6 blocks)"),
    SetBuilder("edge-blocks", _edge_blocks, "whole blocks from both ends of the stack at each --budget"),
    SetBuilder("random", _random, "--random N seeded random draws at each --budget"),
):
    register_set_builder(_builder)


def edge_blocks_plan(model, experts: list[str], budget: float, fmt: str) -> Plan:
    """The fixed rule of several tools at a budget: per expert, whole blocks from both ends of the stack (first,
    last, second, second to last, ...) while they fit in ``budget`` of its parameters; nothing else."""
    family = model.family
    layers = model_layers(model)
    rules = []
    for expert in experts:
        own = [layer for layer in layers if layer.expert == expert]
        total = sum(layer.params for layer in own)
        sizes: dict[str, int] = {}
        for layer in own:
            block = family.block_of(layer.name)
            if block is not None:
                sizes[block] = sizes.get(block, 0) + layer.params
        n = len(sizes)
        order = [i for pair in zip(range(n), reversed(range(n)), strict=True) for i in pair]
        used = 0
        for index in dict.fromkeys(order[:n]):
            block = f"{family.blocks}.{index}"
            if used + sizes[block] > budget * total:
                break
            rules.append(Rule(f"re:{expert}:{re.escape(block)}\\..*", None, None, "first and last blocks"))
            used += sizes[block]
    return Plan(rules + quantize_the_rest(experts, fmt))


def plan_sets(model, paths: list[Path], fmt: str = "hif4") -> list[ProtectedSet]:
    """``none`` (every layer in ``fmt``, the yardstick) and each plan file as a set named after the file.

    Raises:
        InputError: a plan that cannot be read, two files with the same name.
    """
    experts = model.family.experts(model.pipe)
    sets = [ProtectedSet("none", Plan(quantize_the_rest(experts, fmt)), "none")]
    return sets + file_sets(paths, sets)


def file_sets(paths: list[Path], taken: list[ProtectedSet]) -> list[ProtectedSet]:
    """Each plan file as a set named after the file: ``ranked`` when sensq made it from a ranking (its source
    names one), else ``plan``.

    Raises:
        InputError: a plan that cannot be read, a name already taken.
    """
    sets: list[ProtectedSet] = []
    for path in paths:
        name = Path(path).stem
        if any(s.name == name for s in [*taken, *sets]):
            raise InputError(f"two sets would be named {name!r} ({str(path)!r}); rename one plan file")
        plan = Plan.load(path)
        sets.append(ProtectedSet(name, plan, "ranked" if (plan.source or {}).get("ranking_metric") else "plan"))
    return sets


def random_plan(model, experts: list[str], budget: float, fmt: str, seed: int) -> Plan:
    """Protect, per expert, layers drawn at random (seeded) while they fit in ``budget`` of its parameters."""
    import random

    rng = random.Random(seed)
    layers = model_layers(model)
    rules = []
    for expert in experts:
        own = [layer for layer in layers if layer.expert == expert]
        total = sum(layer.params for layer in own)
        params = {layer.name: layer.params for layer in own}
        for name in fill_budget([layer.name for layer in rng.sample(own, len(own))], params, budget * total):
            rules.append(Rule(f"{expert}:{name}", None, None, f"random draw {seed}"))
    return Plan(rules + quantize_the_rest(experts, fmt))


def fill_budget(order: list[str], params: dict[str, int], budget: float) -> list[str]:
    """The layers of ``order`` taken in turn while they fit in ``budget`` parameters (a layer that does not fit
    is skipped, later smaller ones may still be taken)."""
    chosen, used = [], 0
    for name in order:
        if used + params[name] <= budget:
            chosen.append(name)
            used += params[name]
    return chosen
