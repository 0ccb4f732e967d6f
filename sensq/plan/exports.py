"""A plan in the form torchao and ModelOpt load themselves: one file per expert module, exact layer names.

Each library is one module with an :class:`~sensq.plan.exporter.Exporter` registered in :data:`EXPORTERS`
(``sensq/plan/export_torchao.py``, ``export_modelopt.py``); ``sensq plan --export`` offers what is registered.

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

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sensq.errors import InputError
from sensq.formats import Family, get_format
from sensq.plan import export_modelopt, export_torchao, plan_family  # noqa: F401 (each registers its exporter)
from sensq.plan.exporter import EXPORTERS, Exporter, register_exporter
from sensq.plan.layer_config import LayerConfig
from sensq.store.files import atomic_write_bytes, check_output_file

__all__ = ["EXPORTERS", "Exporter", "register_exporter", "build_export", "write_export", "check_export_paths"]


def _exporter(library: str) -> Exporter:
    if library not in EXPORTERS:
        raise InputError(f"--export must be one of {', '.join(sorted(EXPORTERS))}, got {library!r}")
    return EXPORTERS[library]


def export_path(out: Path, library: str, attr: str) -> Path:
    """Where ``library``'s file for the expert module ``pipe.<attr>`` goes, next to the plan ``out``."""
    return out.with_name(f"{out.stem}.{library}.{attr}.{_exporter(library).extension}")


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


def _planned_rows(plan) -> list[LayerConfig]:
    if not plan.layers:
        raise InputError("the plan has no resolved layer table; rebuild it with sensq plan")
    missing = [row.layer for row in plan.layers if row.kind is None]
    if missing:
        raise InputError(f"the plan's layer table does not record layer kinds (made by an older sensq, e.g. "
                         f"{missing[0]!r}); rebuild it with sensq plan to export it")
    phased = [row.name for row in plan.layers if row.step_ranges]
    if phased:
        raise InputError(f"the plan changes {phased[0]!r} (and {len(phased) - 1} more) with the denoising step "
                         "(rules with 'steps' or 'sigma'); torchao and ModelOpt quantize a layer the same at every "
                         "step: export a plan without ranges")
    model_family = plan_family(plan)
    unknown = sorted({row.expert for row in plan.layers} - set(model_family.expert_attrs))
    if unknown:
        raise InputError(f"the plan names expert(s) {unknown} that a {model_family.name} pipeline lacks (it has "
                         f"{', '.join(model_family.expert_attrs)})")
    return plan.layers


def _pair_name(weight: str, activation: str | None) -> str:
    return f"{weight} W/{activation} A" if activation else f"{weight} weight-only"


def build_export(plan, library: str) -> Export:
    """The plan as ``library``'s own configuration, per expert module.

    Raises:
        InputError: an unknown library, a plan without a layer table, no layer the library can take,
            torchao missing (``--export torchao`` builds real torchao configs).
    """
    exporter = _exporter(library)
    export = Export(library)
    chosen: dict[str, list[tuple[str, object]]] = defaultdict(list)
    attrs = plan_family(plan).expert_attrs
    for row in _planned_rows(plan):
        weight_format = get_format(row.weight) if row.weight is not None else None
        if weight_format is None or weight_format.family is Family.BF16:
            continue  # high precision (bf16 rounding is the identity on the bf16 model)
        weight = weight_format.identity
        activation = get_format(row.activation).identity if row.activation else None
        if row.kind != "linear":
            export.unsupported.setdefault(f"equivalent for a quantized {row.kind} layer", []).append(row.name)
            continue
        config = exporter.translate(weight, activation)
        if config is None:
            export.unsupported.setdefault(_pair_name(weight, activation), []).append(row.name)
            continue
        chosen[attrs[row.expert]].append((row.layer, config))
        if row.calibration not in (None, "none"):
            export.calibrated.setdefault(row.calibration, []).append(row.name)
    if not chosen:
        raise InputError(f"nothing to export: {library} takes none of the plan's quantized layers "
                         f"({'; '.join(export.unsupported) or 'every layer is high precision'}); plan with "
                         "--format nvfp4_ts, mxfp4_ocp, int8, fp8_e4m3 or int4 --act-format none to export to "
                         f"{library}")
    for attr, layers in chosen.items():
        export.quantized[attr] = [name for name, _ in layers]
        export.documents[attr] = exporter.document(layers, plan, attr)
    return export


def write_export(export: Export, out: Path) -> dict[str, Path]:
    """Write each expert's file next to ``out`` (atomically; never over a file sensq did not write)."""
    exporter = _exporter(export.library)
    paths = export.paths(out)
    for path in paths.values():
        check_output_file(path, None, f"{export.library} export", recognise=_recognise(export.library))
    for attr, path in paths.items():
        atomic_write_bytes(path, exporter.serialize(export.documents[attr], attr))
    return paths


def check_export_paths(out: Path, library: str, expert_attrs: dict[str, str], plan_experts) -> None:
    """Before any work: the export files next to ``out`` can be written (or are sensq's own)."""
    for attr in filter(None, map(expert_attrs.get, plan_experts)):
        check_output_file(export_path(out, library, attr), None, f"{library} export", recognise=_recognise(library))


def _recognise(library: str):
    """A file at an export path is sensq's own when its first 4 kB say so (the exporter decides how)."""
    exporter = _exporter(library)

    def recognise(path: Path) -> bool:
        try:
            with open(path, "rb") as handle:
                head = handle.read(4096).decode(errors="replace")
        except OSError:
            return False
        return exporter.recognise(head)

    return recognise
