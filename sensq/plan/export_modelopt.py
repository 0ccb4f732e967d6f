"""``sensq plan --export modelopt``: ``<stem>.modelopt.<attr>.yml``, a ModelOpt PTQ recipe (every quantizer
disabled, then the weight and input quantizers of each planned layer enabled) that ``load_recipe`` reads."""

from __future__ import annotations

from sensq.formats import Family, get_format
from sensq.plan.exporter import Exporter, register_exporter

SCHEMA = "sensq.export.modelopt/2"


def _modelopt_quantizer(spec, role: str) -> dict | None:
    """ModelOpt's ``QuantizerAttributeConfig`` fields for one operand (``role`` weight or input)."""
    if spec.family is Family.NVFP4:
        return {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": "e4m3"}}
    if spec.family is Family.MXFP4:
        return {"num_bits": "e2m1", "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": "e8m0"}}
    if spec.family is Family.MXFP8:
        return {"num_bits": "e4m3", "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": "e8m0"}}
    bits = {Family.INT: spec.element_bits, Family.FP8: "e4m3"}.get(spec.family)
    if bits is None or spec.tensor_scale_bits:  # ModelOpt's per-tensor FP8 scale is calibrated, not sensq's amax
        return None
    if spec.block_size is not None:
        if role == "input":
            return None  # ModelOpt's dynamic blocks need a low-bit scale format; sensq's group scales are FP32
        return {"num_bits": bits, "block_sizes": {-1: spec.block_size, "type": "static"}}
    if role == "weight":
        return {"num_bits": bits, "axis": 0}  # per output channel
    return {"num_bits": bits, "axis": None, "type": "dynamic", "block_sizes": {-1: None}}  # per token


def _modelopt_entries(weight: str, activation: str | None) -> list[tuple[str, dict]] | None:
    """The weight (and input) quantizer settings of one layer, or None where ModelOpt has no equivalent."""
    w = _modelopt_quantizer(get_format(weight), "weight")
    a = _modelopt_quantizer(get_format(activation), "input") if activation else None
    if w is None or (activation and a is None):
        return None
    return [("weight_quantizer", w)] + ([("input_quantizer", a)] if a else [])


def _modelopt_document(layers: list[tuple[str, object]], plan, attr: str) -> dict:
    entries: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for name, quantizers in layers:
        entries += [{"quantizer_name": f"{name}.{which}", "cfg": cfg} for which, cfg in quantizers]
    source = plan.source
    description = (f"sensq plan for pipe.{attr} of {plan.model.get('id') or 'the model'}: "
                   f"{len(layers)} layers quantized, every other quantizer disabled "
                   f"(ranking {source.get('ranking_metric')}, budget {source.get('budget')}, "
                   f"top_k {source.get('top_k')})")
    return {"metadata": {"recipe_type": "ptq", "description": description},
            "quantize": {"algorithm": "max", "quant_cfg": entries}}


def _serialize(document: dict, attr: str) -> bytes:
    import yaml

    header = f"# {SCHEMA}: ModelOpt PTQ recipe for pipe.{attr}, written by sensq plan\n"
    return (header + yaml.safe_dump(document, sort_keys=False)).encode()


EXPORTER = register_exporter(Exporter("modelopt", "yml", _modelopt_entries, _modelopt_document, _serialize,
                                      recognise=lambda head: head.startswith(f"# {SCHEMA}")))
