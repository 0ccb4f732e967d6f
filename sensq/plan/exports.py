"""A plan in the form torchao and ModelOpt load themselves: one file per expert module, exact layer names.

Each file configures one expert module as users hold it (``pipe.transformer``, ``pipe.transformer_2``),
so names carry no pipeline prefix, and every quantized layer is named exactly (``re:`` rules are
expanded against the plan's layer table): what the library quantizes is exactly what the plan says.

* torchao: ``<stem>.torchao.<attr>.json`` is ``torchao.core.config.config_to_dict`` of a real
  ``FqnToConfig`` whose values are torchao configs (``Int8DynamicActivationInt8WeightConfig``, ...)::

      from torchao.core.config import config_from_dict
      quantize_(pipe.transformer, config_from_dict(json.load(f)), filter_fn=None)

* ModelOpt: ``<stem>.modelopt.<attr>.yml`` is a ModelOpt PTQ recipe (disable every quantizer, then
  enable the weight and input quantizers of each planned layer)::

      from modelopt.recipe import load_recipe
      mtq.quantize(pipe.transformer, load_recipe(path).quantize, forward_loop)

A format pair a library does not have (HiF4 in both; a quantized patch-embedding Conv3d, which
torchao's configs do not take and ModelOpt blocks along another axis) is left out of that file, so the
library keeps those layers in high precision; :class:`Export` lists them for the one line the CLI
prints. The libraries compute their own scales: a model quantized by them is close to, not
bit-identical with, what sensq measured (use ``mxfp4_ocp``/``nvfp4_ts`` for the closest numerics).
"""

from __future__ import annotations

import json
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sensq.errors import InputError
from sensq.formats import Family, get_format
from sensq.plan import plan_family
from sensq.store.files import atomic_write_bytes, check_output_file

LIBRARIES = ("torchao", "modelopt")
TORCHAO_SCHEMA = "sensq.export.torchao/2"
MODELOPT_SCHEMA = "sensq.export.modelopt/2"


def export_path(out: Path, library: str, attr: str) -> Path:
    """Where ``library``'s file for the expert module ``pipe.<attr>`` goes, next to the plan ``out``."""
    return out.with_name(f"{out.stem}.{library}.{attr}.{'json' if library == 'torchao' else 'yml'}")


@dataclass
class Export:
    """One library's files: ``documents[attr]`` is what goes into ``<stem>.<library>.<attr>.<ext>``."""

    library: str
    documents: dict[str, object] = field(default_factory=dict)
    quantized: dict[str, list[str]] = field(default_factory=dict)  # attr -> exported layer names
    unsupported: dict[str, list[str]] = field(default_factory=dict)  # reason -> ["expert:layer", ...]
    calibrated: dict[str, list[str]] = field(default_factory=dict)  # a rule's calibration -> exported layers

    def paths(self, out: Path) -> dict[str, Path]:
        return {attr: export_path(out, self.library, attr) for attr in self.documents}

    def unsupported_lines(self) -> list[str]:
        """One line per reason: what the library lacks and which layers therefore stay high precision."""
        lines = []
        for reason, layers in self.unsupported.items():
            per_expert = defaultdict(int)
            for name in layers:
                per_expert[name.partition(":")[0]] += 1
            counts = ", ".join(f"{n} of {expert}" for expert, n in sorted(per_expert.items()))
            lines.append(f"{self.library} has no {reason}: {len(layers)} planned layer(s) ({counts}) are left out of "
                         f"the export and stay in high precision there")
        for method, layers in self.calibrated.items():
            lines.append(f"the plan calibrates {len(layers)} exported layer(s) with {method}; the export carries "
                         f"formats only, and {self.library} rounds and calibrates them its own way")
        return lines


def _planned_rows(plan) -> list[dict]:
    if not plan.layers:
        raise InputError("the plan has no resolved layer table; rebuild it with sensq plan")
    missing = [row["layer"] for row in plan.layers if "kind" not in row]
    if missing:
        raise InputError(f"the plan's layer table does not record layer kinds (made by an older sensq, e.g. "
                         f"{missing[0]!r}); rebuild it with sensq plan to export it")
    phased = [f"{row['expert']}:{row['layer']}" for row in plan.layers if row.get("phases")]
    if phased:
        raise InputError(f"the plan changes {phased[0]!r} (and {len(phased) - 1} more) with the denoising step "
                         "(rules with 'steps' or 'sigma'); torchao and ModelOpt quantize a layer the same at every "
                         "step: export a plan without ranges")
    family = plan_family(plan)
    unknown = sorted({row["expert"] for row in plan.layers} - set(family.expert_attrs))
    if unknown:
        raise InputError(f"the plan names expert(s) {unknown} that a {family.name} pipeline lacks (it has "
                         f"{', '.join(family.expert_attrs)})")
    return plan.layers


def _pair_name(weight: str, activation: str | None) -> str:
    return f"{weight} W/{activation} A" if activation else f"{weight} weight-only"


def build_export(plan, library: str) -> Export:
    """The plan as ``library``'s own configuration, per expert module.

    Raises:
        InputError: an unknown library, a plan without a layer table, no layer the library can take,
            torchao missing (``--export torchao`` builds real torchao configs).
    """
    if library not in LIBRARIES:
        raise InputError(f"--export must be one of {', '.join(LIBRARIES)}, got {library!r}")
    translate = _torchao_config if library == "torchao" else _modelopt_entries
    export = Export(library)
    chosen: dict[str, list[tuple[str, object]]] = defaultdict(list)
    attrs = plan_family(plan).expert_attrs
    for row in _planned_rows(plan):
        weight_format = get_format(row["weight"]) if row["weight"] is not None else None
        if weight_format is None or weight_format.family is Family.BF16:
            continue  # high precision (bf16 rounding is the identity on the bf16 model)
        weight = weight_format.identity
        activation = get_format(row["activation"]).identity if row["activation"] else None
        if row["kind"] != "linear":
            export.unsupported.setdefault(f"equivalent for a quantized {row['kind']} layer", []).append(
                f"{row['expert']}:{row['layer']}")
            continue
        config = translate(weight, activation)
        if config is None:
            export.unsupported.setdefault(_pair_name(weight, activation), []).append(f"{row['expert']}:{row['layer']}")
            continue
        chosen[attrs[row["expert"]]].append((row["layer"], config))
        if row.get("calibration") not in (None, "none"):
            export.calibrated.setdefault(row["calibration"], []).append(f"{row['expert']}:{row['layer']}")
    if not chosen:
        raise InputError(f"nothing to export: {library} takes none of the plan's quantized layers "
                         f"({'; '.join(export.unsupported) or 'every layer is high precision'}); plan with "
                         "--format nvfp4_ts, mxfp4_ocp, int8, fp8_e4m3 or int4 --act-format none to export to "
                         f"{library}")
    for attr, layers in chosen.items():
        export.quantized[attr] = [name for name, _ in layers]
        export.documents[attr] = (_torchao_document(layers, plan, attr) if library == "torchao"
                                  else _modelopt_document(layers, plan, attr))
    return export


def write_export(export: Export, out: Path) -> dict[str, Path]:
    """Write each expert's file next to ``out`` (atomically; never over a file sensq did not write)."""
    paths = export.paths(out)
    for path in paths.values():
        check_output_file(path, None, f"{export.library} export", recognise=_recognise(export.library))
    for attr, path in paths.items():
        document = export.documents[attr]
        if export.library == "torchao":
            data = json.dumps(document, indent=1).encode()
        else:
            import yaml

            header = f"# {MODELOPT_SCHEMA}: ModelOpt PTQ recipe for pipe.{attr}, written by sensq plan\n"
            data = (header + yaml.safe_dump(document, sort_keys=False)).encode()
        atomic_write_bytes(path, data)
    return paths


def check_export_paths(out: Path, library: str, expert_attrs: dict[str, str], plan_experts) -> None:
    """Before any work: the export files next to ``out`` can be written (or are sensq's own)."""
    for attr in filter(None, map(expert_attrs.get, plan_experts)):
        check_output_file(export_path(out, library, attr), None, f"{library} export", recognise=_recognise(library))


def _recognise(library: str):
    def recognise(path: Path) -> bool:
        try:
            with open(path, "rb") as handle:
                head = handle.read(4096).decode(errors="replace")
        except OSError:
            return False
        if library == "modelopt":
            return head.startswith(f"# {MODELOPT_SCHEMA}")
        return f'"schema": "{TORCHAO_SCHEMA}"' in head

    return recognise


def _provenance(plan, attr: str) -> dict:
    return {"module": f"pipe.{attr}", "model": plan.model.get("id"),
            "plan_source": {k: plan.source.get(k) for k in ("ranking_file", "budget", "top_k", "ranking_metric")}}


# torchao ----------------------------------------------------------------------------------------------------------

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
    if w.family is Family.FP8 and w.block_size is None:
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
    return {"schema": TORCHAO_SCHEMA, "sensq": _provenance(plan, attr), **document}  # schema first: recognisable


# ModelOpt ---------------------------------------------------------------------------------------------------------

def _modelopt_quantizer(spec, role: str) -> dict | None:
    """ModelOpt's ``QuantizerAttributeConfig`` fields for one operand (``role`` weight or input)."""
    if spec.family is Family.NVFP4:
        return {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": "e4m3"}}
    if spec.family is Family.MXFP4:
        return {"num_bits": "e2m1", "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": "e8m0"}}
    bits = {Family.INT: spec.element_bits, Family.FP8: "e4m3"}.get(spec.family)
    if bits is None:
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
