"""``quantize_``: put a plan into a model (in place), and ``dequantize_`` to take it out again."""

from __future__ import annotations

import torch

from sensq.plan import Plan, model_layers, validate_plan
from sensq.quant.layers import is_quantized, original_module, swap


def quantize_(model, plan: Plan, backend: str = "auto") -> list[dict]:
    """Swap every layer the plan quantizes for its fake-quantized twin, expert by expert.

    ``model`` is a :class:`sensq.models.LoadedModel`. Layers the plan keeps in high precision are
    not touched (the very same module objects). Returns the resolved table.

    Raises:
        InputError: a rule that matches no layer of this model, or a layer no rule decides.
    """
    return apply_plan(model, plan, backend=backend)[0]


def dequantize_(model) -> None:
    """Put plain layers back everywhere (exact: the twins share the original parameters)."""
    for expert_name in model.adapter.experts(model.pipe):
        expert = model.adapter.expert_module(model.pipe, expert_name)
        for name, module in list(expert.named_modules()):
            if is_quantized(module):
                swap(expert, name, original_module(module))


def offload_experts(model) -> None:
    """Keep only the running block of each expert on the execution device (diffusers group offloading,
    block level; the rest waits on the host). A no-op in effect when the model runs on the CPU."""
    from diffusers.hooks import apply_group_offloading

    for expert in model.adapter.experts(model.pipe):
        apply_group_offloading(model.adapter.expert_module(model.pipe, expert), onload_device=model.device,
                               offload_device=torch.device("cpu"), offload_type="block_level",
                               num_blocks_per_group=1)


def apply_plan(model, plan: Plan, *, probe_path=None, calibrate: str = "none", sequential_experts: bool = False,
               backend: str = "auto", force: bool = False, offload: bool = False,
               progress=None) -> tuple[list[dict], dict]:
    """Quantize ``model`` by ``plan`` expert by expert, calibrated on ``probe_path`` when asked.

    With ``sequential_experts`` the low-noise expert is calibrated on a fresh probe of the trajectory
    run with the already-quantized high-noise expert (same prompts, seeds and trajectory as the probe
    file), so its calibration sees the high expert's quantization error.

    Returns:
        The resolved table and ``{expert: {layer: LayerCalibration}}``.

    Raises:
        InputError: a plan for another model (unless ``force``), unmatched rules, ``mse`` without a probe
            file, a probe file from another model (unless ``force``).
    """
    import tempfile
    from pathlib import Path

    from sensq.errors import InputError
    from sensq.quant.calibrate import calibrate_expert
    from sensq.store.probe_file import ProbeFile

    planned_for = (plan.model or {}).get("fingerprint")
    if planned_for and planned_for != model.fingerprint and not force:
        loras = (plan.model or {}).get("loras") or {}
        hint = (f" (it was made with LoRAs {', '.join(f'{e}={p}' for e, p in sorted(loras.items()))}: pass the same "
                "--lora-high/--lora-low)" if loras != model.loras else "")
        raise InputError(f"the plan was made for model fingerprint {planned_for} but this model has "
                         f"{model.fingerprint}{hint}; pass --force to apply it anyway")
    table = validate_plan(plan, model_layers(model))
    if offload:
        offload_experts(model)
    if calibrate != "none" and probe_path is None:
        raise InputError("--calibrate mse needs --probe PROBE.h5 (the captured inputs to calibrate on)")
    calibration: dict = {}
    experts = model.adapter.experts(model.pipe)
    if calibrate == "none":
        for expert in experts:
            calibration[expert] = calibrate_expert(model.adapter.expert_module(model.pipe, expert), expert, table,
                                                   None, model.adapter, method="none", backend=backend)
        return table, calibration
    with ProbeFile(probe_path) as probe:
        if probe.model_fingerprint != model.fingerprint and not force:
            hint = (f"; it was probed with LoRAs {probe.loras}: pass the same --lora-high/--lora-low"
                    if probe.loras != model.loras else "")
            raise InputError(f"{str(probe_path)!r} was probed on another model (fingerprint "
                             f"{probe.model_fingerprint}, this model {model.fingerprint}){hint}; or pass --force")
        # sequential: every expert after the first is calibrated on a re-probe made with the experts before
        # it already quantized (the trajectory's later steps see what the quantized earlier expert produced)
        later = experts[1:] if sequential_experts else []
        for expert in experts:
            if expert in later:
                continue
            calibration[expert] = calibrate_expert(model.adapter.expert_module(model.pipe, expert), expert, table,
                                                   probe, model.adapter, method=calibrate, backend=backend,
                                                   device=model.device, progress=progress)
        if later:
            from sensq.probes.capture import ProbeConfig
            from sensq.probes.recorder import ProbeRequest, run_probe
            from sensq.prompts import Prompt
            from sensq.trajectory import Trajectory

            trajectory = Trajectory.from_dict(probe.attr_json("trajectory"))
            prompts = [Prompt(int(i), t, n) for i, t, n, d in
                       zip(probe.prompt_index, probe.prompts, probe.negatives, probe.done, strict=True) if d]
            config = ProbeConfig(**probe.attr_json("probe_config"))
    for expert in later:
        with tempfile.TemporaryDirectory() as tmp:
            reprobe = Path(tmp) / f"{expert}_after_quantized_earlier_experts.h5"
            run_probe(ProbeRequest(model, trajectory, prompts, [expert], reprobe, config=config))
            with ProbeFile(reprobe) as probe:
                calibration[expert] = calibrate_expert(model.adapter.expert_module(model.pipe, expert), expert,
                                                       table, probe, model.adapter, method=calibrate,
                                                       backend=backend, device=model.device, progress=progress)
    return table, calibration
