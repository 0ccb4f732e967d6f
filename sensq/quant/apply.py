"""``quantize_``: put a plan into a model (in place), and ``dequantize_`` to take it out again."""

from __future__ import annotations

from sensq.models.wan import WanAdapter
from sensq.plan import Plan, model_layers, validate_plan
from sensq.quant.layers import is_quantized, original_module, quantize_module, swap


def quantize_(model, plan: Plan, backend: str = "auto") -> list[dict]:
    """Swap every layer the plan quantizes for its fake-quantized twin, expert by expert.

    ``model`` is a :class:`sensq.models.LoadedModel`. Layers the plan keeps in high precision are
    not touched (the very same module objects). Returns the resolved table.

    Raises:
        InputError: a rule that matches no layer of this model, or a layer no rule decides.
    """
    table = validate_plan(plan, model_layers(model))
    adapter: WanAdapter = model.adapter
    for row in table:
        if row["weight"] is None and row["activation"] is None:
            continue
        expert = adapter.expert_module(model.pipe, row["expert"])
        swap(expert, row["layer"], quantize_module(expert.get_submodule(row["layer"]), row["weight"],
                                                   row["activation"], backend))
    return table


def dequantize_(model) -> None:
    """Put every original layer back (exact: the originals were kept inside the twins)."""
    from sensq.models.wan import quantizable_layers

    for expert_name in model.adapter.experts(model.pipe):
        expert = model.adapter.expert_module(model.pipe, expert_name)
        for name, module in list(expert.named_modules()):
            if is_quantized(module):
                swap(expert, name, original_module(module))
        quantizable_layers(expert)  # sanity: the inventory is plain again
