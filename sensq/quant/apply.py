"""``quantize_``: put a plan into a model (in place), and ``dequantize_`` to take it out again."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from sensq.errors import InputError
from sensq.models.layers import quantizable_layers
from sensq.plan import LayerConfig, Plan, model_layers, validate_plan
from sensq.plan.calibrations import needs_data
from sensq.quant.calibrate import calibrate_expert, method_of
from sensq.quant.layers import is_quantized, original_module, swap
from sensq.quant.phased import is_phased, phased_layer, remove_step_clock, step_clock


def quantize_(model, plan: Plan, backend: str = "auto") -> list[LayerConfig]:
    """Swap every layer the plan quantizes for its fake-quantized twin, expert by expert.

    ``model`` is a :class:`sensq.models.LoadedModel`. Layers the plan keeps in high precision are
    not touched (the very same module objects). Returns the resolved table.

    Raises:
        InputError: a rule that matches no layer of this model, or a layer no rule decides.
    """
    return apply_plan(model, plan, backend=backend)[0]


def dequantize_(model) -> None:
    """Put plain layers back everywhere (exact: the twins share the original parameters)."""
    for expert_name in model.family.experts(model.pipe):
        expert = model.family.expert_module(model.pipe, expert_name)
        for name, module in quantizable_layers(expert):  # a phased layer is one layer: its variants are inside
            if is_phased(module):
                swap(expert, name, original_module(module.base))
            elif is_quantized(module):
                swap(expert, name, original_module(module))
    remove_step_clock(model.pipe)


def phase_layers(model, table: list[LayerConfig], expert: str, backend: str = "auto") -> int:
    """Wrap every layer of ``expert`` whose resolved row has ``phases`` (rules with a step or sigma range) in a
    :class:`sensq.quant.phased.PhasedLayer` around its current module (quantized by the plan, calibrated or
    not). Returns how many layers were wrapped."""
    module = model.family.expert_module(model.pipe, expert)
    rows = [row for row in table if row.expert == expert and row.step_ranges]
    for row in rows:
        clock = step_clock(model.pipe, model.family)
        swap(module, row.layer, phased_layer(module.get_submodule(row.layer), row, clock, backend))
    return len(rows)


def offload_experts(model) -> None:
    """Keep only the running block of each expert on the execution device (diffusers group offloading,
    block level; the rest waits on the host). A no-op in effect when the model runs on the CPU."""
    from diffusers.hooks import apply_group_offloading

    for expert in model.family.experts(model.pipe):
        apply_group_offloading(model.family.expert_module(model.pipe, expert), onload_device=model.device,
                               offload_device=torch.device("cpu"), offload_type="block_level",
                               num_blocks_per_group=1)


Reprobe = Callable[[object, str, object, Path], None]
"""``reprobe(model, expert, probe_file, out)``: write to ``out`` a fresh probe of ``expert`` that runs the
``probe_file``'s trajectory, prompts and config on ``model`` as it is now (:func:`sensq.workflows.reprobe`)."""


def apply_plan(model, plan: Plan, *, probe_path=None, calibrate: str = "none", reprobe: Reprobe | None = None,
               backend: str = "auto", force: bool = False, offload: bool = False,
               probe_from_another_model: bool = False, pooled_experts: bool = False,
               progress=None) -> tuple[list[LayerConfig], dict]:
    """Quantize ``model`` by ``plan`` expert by expert, calibrated on ``probe_path`` when asked.

    With ``reprobe`` every expert after the first (Wan2.2: the low-noise one) is calibrated on a fresh probe
    that ``reprobe`` writes with the experts before it already quantized (same prompts, seeds and trajectory as
    the probe file), so its calibration sees their quantization error (``--sequential-experts``:
    :func:`sensq.workflows.apply_plan` passes :func:`sensq.workflows.reprobe`).

    ``pooled_experts``: every expert is calibrated on the captured inputs of all experts pooled (the calibration
    set of the whole trajectory, the alternative to the study's expert-by-expert sets; needs every expert in
    the probe file, and cannot be combined with ``sequential_experts``).

    ``probe_from_another_model``: calibrate on inputs captured with another model (a 4-step student calibrated
    on its 40-step teacher's probe, as the study does); the layer names must match. Record it with
    :func:`calibration_source`.

    Returns:
        The resolved table and ``{expert: {layer: LayerCalibration}}``.

    Raises:
        InputError: a plan for another model (unless ``force``), unmatched rules, ``mse`` without a probe
            file, a probe file from another model (unless ``force`` or ``probe_from_another_model``).
    """
    from sensq.store.probe_file import ProbeFile

    _check_made_for(plan, model, force)
    table = validate_plan(plan, model_layers(model))
    if offload:
        offload_experts(model)
    methods = {method_of(row, calibrate) for row in table if row.quantized}
    if any(map(needs_data, methods)) and probe_path is None:
        which = f"--calibrate {calibrate} needs" if calibrate != "none" else "the plan's 'calibration' rules need"
        raise InputError(f"{which} --probe PROBE.h5 (the captured inputs to calibrate on)")
    family, experts = model.family, model.family.experts(model.pipe)
    if pooled_experts and reprobe is not None:
        raise InputError("--pooled-experts and --sequential-experts exclude each other: a pooled set is drawn "
                         "from the full-precision trajectory of every expert")

    def calibrate_one(expert, probe, method):
        calibration = calibrate_expert(family.expert_module(model.pipe, expert), expert, table, probe, family,
                                       method=method, backend=backend, device=model.device, progress=progress,
                                       pooled=tuple(experts) if pooled_experts else ())
        phase_layers(model, table, expert, backend)
        return calibration

    if not any(map(needs_data, methods)):
        return table, {expert: calibrate_one(expert, None, calibrate) for expert in experts}
    later = experts[1:] if reprobe is not None else []
    calibration: dict = {}
    with ProbeFile(probe_path) as probe:
        if probe.model_fingerprint != model.fingerprint and not (force or probe_from_another_model):
            hint = (f"; it was probed with LoRAs {probe.loras}: pass the same --lora-high/--lora-low"
                    if probe.loras != model.loras else "")
            raise InputError(f"{str(probe_path)!r} was probed on another model (fingerprint "
                             f"{probe.model_fingerprint}, this model {model.fingerprint}){hint}; to calibrate on "
                             "another model's inputs on purpose pass --probe-from-another-model")
        for expert in experts:
            if expert not in later:
                calibration[expert] = calibrate_one(expert, probe, calibrate)
        for expert in later:  # each on a re-probe made with the experts before it already quantized
            with tempfile.TemporaryDirectory() as tmp:
                fresh = Path(tmp) / f"{expert}_after_quantized_earlier_experts.h5"
                reprobe(model, expert, probe, fresh)
                with ProbeFile(fresh) as again:
                    calibration[expert] = calibrate_one(expert, again, calibrate)
    return table, calibration


def calibration_source(model, probe_path, calibrate: str, sequential_experts: bool,
                       pooled_experts: bool = False) -> dict:
    """What a checkpoint records of its calibration: the default method, and the probe it was calibrated on
    (its model, trajectory and prompts, and whether that is another model or trajectory than this one)."""
    from sensq.store.files import file_digest
    from sensq.store.probe_file import ProbeFile

    source = {"default": calibrate, "sequential_experts": sequential_experts, "pooled_experts": pooled_experts,
              "probe": None}
    if probe_path is None:
        return source
    with ProbeFile(probe_path) as probe:
        trajectory = probe.attr_json("trajectory")
        source["probe"] = {
            "file": str(probe_path), "sha256": file_digest(probe_path, length=64), "model_id": probe.model_id,
            "model_fingerprint": probe.model_fingerprint, "loras": probe.loras,
            "another_model": probe.model_fingerprint != model.fingerprint,
            "trajectory": trajectory, "prompts": int(probe.done.sum()),
        }
    return source


def _check_made_for(plan: Plan, model, force: bool) -> None:
    """Raises InputError when the plan records another model's fingerprint (unless ``force``)."""
    planned_for = (plan.model or {}).get("fingerprint")
    if planned_for and planned_for != model.fingerprint and not force:
        loras = (plan.model or {}).get("loras") or {}
        hint = (f" (it was made with LoRAs {', '.join(f'{e}={p}' for e, p in sorted(loras.items()))}: pass the same "
                "--lora-high/--lora-low)" if loras != model.loras else "")
        raise InputError(f"the plan was made for model fingerprint {planned_for} but this model has "
                         f"{model.fingerprint}{hint}; pass --force to apply it anyway")
