"""Protected-set ablation: which layers to keep in high precision, measured end to end.

* :mod:`sensq.ablate.sets`: the protected sets (their kinds, the standard ones from a ranking, plan files);
* :mod:`sensq.ablate.run`: deploy each set as ``apply-plan`` does, generate, score against full precision;
* :mod:`sensq.ablate.statistics`: intervals, paired comparisons and the headline.

The report is :mod:`sensq.report.ablation`.
"""

from sensq.ablate.run import SEED_STRIDE, generation_complete, hash_rules, run_ablation, seed_bases
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

__all__ = ["ABLATION_SCHEMA", "METRICS", "SEED_STRIDE", "SET_KINDS", "ProtectedSet", "SetBuilder", "SetContext",
           "SetKind", "aggregate", "register_set_builder", "set_builders", "unregister_set_builder",
           "compare_rows", "edge_blocks_plan", "file_sets", "fill_budget", "generation_complete", "hash_rules",
           "headline", "load_ablation", "plan_sets", "quantize_the_rest", "random_plan", "run_ablation",
           "seed_bases", "slug", "standard_sets"]
