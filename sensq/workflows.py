"""Workflows that join the library's parts above the quantizer and the probe recorder: applying a plan with the
low-noise expert calibrated behind the quantized high-noise one (``--sequential-experts``), and re-running a
probe file's own run. The CLI and experiments/ call these instead of wiring probes and quantizers themselves.
"""

from __future__ import annotations

from pathlib import Path

from sensq.plan import LayerConfig, Plan
from sensq.probes.capture import ProbeConfig
from sensq.probes.recorder import ProbeRequest, run_probe
from sensq.prompts import Prompt
from sensq.quant.apply import apply_plan as _apply_plan
from sensq.trajectory import Trajectory


def rerun_of(probe) -> tuple[Trajectory, list[Prompt], ProbeConfig]:
    """What re-probes the same run: an open probe file's trajectory, its finished prompts and its config."""
    trajectory = Trajectory.from_dict(probe.attr_json("trajectory"))
    prompts = [Prompt(int(i), t, n) for i, t, n, d in
               zip(probe.prompt_index, probe.prompts, probe.negatives, probe.done, strict=True) if d]
    return trajectory, prompts, ProbeConfig(**probe.attr_json("probe_config"))


def reprobe(model, expert: str, probe, out: Path) -> None:
    """Probe ``expert`` of ``model`` as it is now (earlier experts quantized) into ``out``, on the run ``probe``
    (an open :class:`sensq.store.probe_file.ProbeFile`) recorded: same trajectory, prompts, seeds and config."""
    trajectory, prompts, config = rerun_of(probe)
    run_probe(ProbeRequest(model, trajectory, prompts, [expert], out, config=config))


def apply_plan(model, plan: Plan, *, sequential_experts: bool = False, **options) -> tuple[list[LayerConfig], dict]:
    """:func:`sensq.quant.apply.apply_plan`, with ``sequential_experts``: every expert after the first is
    calibrated on a re-probe (:func:`reprobe`) made with the experts before it already quantized."""
    return _apply_plan(model, plan, reprobe=reprobe if sequential_experts else None, **options)
