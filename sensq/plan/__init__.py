"""Mixed-precision plans (``sensq.plan/1``): which layers of which expert keep high precision.

A plan is an ordered list of rules ``{match, weight, activation}``. ``match`` is an
expert-qualified layer name (``high:blocks.0.attn1.to_q``) or a regex over the same
(``re:low:blocks\\.3[0-9]\\..*``); the first rule that matches a layer decides its formats; a
``null`` format keeps that operand in high precision. A rule that matches no layer is an error.
The plan file also carries the resolved per-layer table (for audit) and a summary.

``re:`` rules are matched with RE2 (google-re2): linear time in the layer name whatever the pattern,
so a plan from someone else cannot stall sensq with catastrophic backtracking (``(.*.*.*)*X``).
RE2 has no look-around or back-references; layer patterns never need them.
"""

from sensq.models.family import recorded_family  # noqa: F401 (plans name their family)
from sensq.models.layers import LayerInfo, layer_infos  # noqa: F401 (a plan resolves against these)
from sensq.plan.build import build_plan, entrance_by_default, plan_protecting, refuse_nan_values
from sensq.plan.layer_config import LayerConfig, StepRange
from sensq.plan.rules import (
    CALIBRATIONS,
    CALIBRATIONS_WITHOUT_DATA,
    HIGH_PRECISION_BITS,
    MAX_PATTERN_LENGTH,
    PLAN_SCHEMA,
    Plan,
    Rule,
    compile_pattern,
    model_layers,
    parse_budget,
    plan_family,
    resident_bits,
    resolve,
    summarize,
    summary_at_real_size,
    validate_plan,
    with_calibration,
)

__all__ = ["CALIBRATIONS", "CALIBRATIONS_WITHOUT_DATA", "HIGH_PRECISION_BITS", "MAX_PATTERN_LENGTH", "PLAN_SCHEMA",
           "LayerConfig", "LayerInfo", "Plan", "Rule", "StepRange", "build_plan", "compile_pattern",
           "entrance_by_default", "layer_infos", "model_layers", "parse_budget", "plan_family", "plan_protecting",
           "recorded_family", "refuse_nan_values", "resident_bits", "resolve", "summarize", "summary_at_real_size",
           "validate_plan", "with_calibration"]
