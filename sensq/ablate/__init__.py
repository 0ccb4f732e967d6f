"""Protected-set ablation: which layers to keep in high precision, measured end to end.

* :mod:`sensq.ablate.sets`: the protected sets (their kinds, the standard ones from a ranking, plan files);
* :mod:`sensq.ablate.run`: deploy each set as ``apply-plan`` does, generate, score against full precision;
* :mod:`sensq.ablate.statistics`: intervals, paired comparisons and the headline.

The report is :mod:`sensq.report.ablation`.
"""

from sensq.ablate.sets import (
    SET_KINDS,
    ProtectedSet,
    SetBuilder,
    SetContext,
    SetKind,
    edge_blocks_plan,
    file_sets,
    fill_budget,
    plan_sets,
    quantize_the_rest,
    random_plan,
    register_set_builder,
    set_builders,
    slug,
    standard_sets,
    unregister_set_builder,
)
from sensq.ablate.statistics import ABLATION_SCHEMA, METRICS, aggregate, compare_rows, headline, load_ablation

_RUN = ("SEED_STRIDE", "generation_complete", "hash_rules", "run_ablation", "seed_bases")


def __getattr__(name: str):
    """The runner's names, imported on first use: it pulls in diffusers, which the CLI's help and choices do not
    need (they read the set builders)."""
    if name in _RUN:
        from sensq.ablate import run

        return getattr(run, name)
    raise AttributeError(f"module 'sensq.ablate' has no attribute {name!r}")


__all__ = ["ABLATION_SCHEMA", "METRICS", "SEED_STRIDE", "SET_KINDS", "ProtectedSet", "SetBuilder", "SetContext",
           "SetKind", "aggregate", "register_set_builder", "set_builders", "unregister_set_builder",
           "compare_rows", "edge_blocks_plan", "file_sets", "fill_budget", "generation_complete", "hash_rules",
           "headline", "load_ablation", "plan_sets", "quantize_the_rest", "random_plan", "run_ablation",
           "seed_bases", "slug", "standard_sets"]
