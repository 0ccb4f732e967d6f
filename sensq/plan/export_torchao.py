"""``sensq plan --export torchao``: ``<stem>.torchao.<attr>.json``, torchao's ``config_to_dict`` of a real
``FqnToConfig`` whose values are torchao configs; ``config_from_dict`` rebuilds it."""

from __future__ import annotations

import json
from collections import OrderedDict

from sensq.errors import InputError
from sensq.formats import Family, get_format
from sensq.plan.exporter import Exporter, provenance, register_exporter

SCHEMA = "sensq.export.torchao/2"


def _import_torchao():
    try:
        import torchao.quantization as quantization
        from torchao.core.config import config_to_dict
        from torchao.prototype import mx_formats
    except ImportError:
        raise InputError("--export torchao builds torchao's own config objects: install torchao "
                         "(pip install 'torchao>=0.18' --no-deps)") from None
    return quantization, mx_formats, config_to_dict


def _torchao_config(weight: str, activation: str | None):
    """torchao's config for a sensq (weight, activation) pair, or None where torchao has no equivalent."""
    import torch

    quantization, mx, _ = _import_torchao()
    from torchao.quantization.granularity import PerAxis, PerGroup, PerRow
    from torchao.quantization.quant_primitives import MappingType

    w, a = get_format(weight), get_format(activation) if activation else None
    if w.family is Family.HIF4 or (a is not None and a.family is Family.HIF4):
        return None
    if w.family is Family.NVFP4 and (a is None or a.family is Family.NVFP4):
        per_tensor = w.tensor_scale_bits > 0
        if a is None:
            return mx.NVFP4WeightOnlyConfig(use_dynamic_per_tensor_scale=per_tensor)
        if (a.tensor_scale_bits > 0) != per_tensor:
            return None
        return mx.NVFP4DynamicActivationNVFP4WeightConfig(use_dynamic_per_tensor_scale=per_tensor)
    if w.family is Family.MXFP4 and a is not None and a.family is Family.MXFP4:
        fp4 = torch.float4_e2m1fn_x2  # OCP scale 2^(floor(log2 amax) - 2): torchao's FLOOR mode
        return mx.MXDynamicActivationMXWeightConfig(activation_dtype=fp4, weight_dtype=fp4,
                                                    scaling_mode=mx.config.ScaleCalculationMode.FLOOR)
    if w.family is Family.MXFP8 and a is not None and a.family is Family.MXFP8:
        fp8 = torch.float8_e4m3fn  # OCP scale 2^(floor(log2 amax) - 8): torchao's FLOOR mode
        return mx.MXDynamicActivationMXWeightConfig(activation_dtype=fp8, weight_dtype=fp8,
                                                    scaling_mode=mx.config.ScaleCalculationMode.FLOOR)
    if w.family is Family.FP8 and w.block_size is None and not w.tensor_scale_bits:
        if a is None:
            return quantization.Float8WeightOnlyConfig(granularity=PerRow())
        if a.family is Family.FP8 and a.block_size is None:
            return quantization.Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        return None
    if w.family is Family.INT:
        granularity = PerAxis(0) if w.block_size is None else PerGroup(w.block_size)
        dtype = getattr(torch, f"int{w.element_bits}")
        if a is None:
            return quantization.IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity,
                                                     mapping_type=MappingType.SYMMETRIC)
        if (a.family is Family.INT and a.element_bits == 8 and a.block_size is None and w.element_bits == 8
                and w.block_size is None):
            return quantization.Int8DynamicActivationInt8WeightConfig()
        # torchao's int8-activation/intx-weight config quantizes activations asymmetrically: not sensq's int8
    return None


def _torchao_document(layers: list[tuple[str, object]], plan, attr: str) -> dict:
    from torchao.quantization import FqnToConfig

    _, _, config_to_dict = _import_torchao()
    document = config_to_dict(FqnToConfig(OrderedDict(layers)))
    return {"schema": SCHEMA, "sensq": provenance(plan, attr), **document}  # schema first: recognisable


EXPORTER = register_exporter(Exporter(
    "torchao", "json", _torchao_config, _torchao_document,
    serialize=lambda document, attr: json.dumps(document, indent=1).encode(),
    recognise=lambda head: f'"schema": "{SCHEMA}"' in head))
