"""The whole method on an embedded model, end to end (``sensq demo``): probe, rank, plan, report, apply-plan,
generate, eval, ablate, report again; rerunning reuses what is finished. The library part of the command: it
says what it does through ``say`` and shows long work through ``progress_bar``; the CLI prints."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Demo:
    """One demo run: the embedded ``model``, the format, prompts, steps, budget and seeds, into ``out``."""

    model: str
    fmt: str
    n_prompts: int
    steps: int
    budget: str
    seeds: int
    out: Path
    say: Callable[[str], None] = print
    progress_bar: Callable = lambda label: nullcontext(None)  # noqa: E731 - the CLI passes its rich bars

    def run(self) -> dict:
        """Every stage in turn; returns the ablation's result."""
        from sensq.loading import load_model
        from sensq.prompts import load_prompts
        from sensq.trajectory import Trajectory

        loaded = load_model(self.model, torch.device("cpu"), torch.float32)
        trajectory = Trajectory(steps=self.steps).with_resolution(loaded.default_resolution)
        prompts = load_prompts(None, self.n_prompts, procedural=loaded.procedural)
        ranking, plan = self.rank_and_plan(loaded, trajectory, prompts)
        fp = load_model(self.model, torch.device("cpu"), torch.float32)  # full precision: `loaded` gets quantized
        self.quantize_and_generate(loaded, fp, plan, trajectory, prompts)
        return self.ablate(fp, ranking, trajectory, prompts)

    @property
    def probe_path(self) -> Path:
        return self.out / "probe.h5"

    def rank_and_plan(self, loaded, trajectory, prompts):
        """Probe both experts, rank by the default metric (and nvfp4 beside the format), plan within the budget,
        and report the ranking with the plan."""
        from sensq.metrics import DEFAULT_METRIC
        from sensq.plan import build_plan, parse_budget
        from sensq.probes.recorder import ProbeRequest, run_probe
        from sensq.report.ranking import write_ranking_report
        from sensq.sensitivity import RankRequest, rank_layers

        self.say(f"probe: {self.model}, {len(prompts)} prompts x {self.steps} UniPC steps with CFG, both experts "
                 f"-> {self.probe_path}")
        run_probe(ProbeRequest(loaded, trajectory, prompts, loaded.family.experts(loaded.pipe), self.probe_path,
                               resume=self.probe_path.exists()))
        self.say(f"rank: --metric {DEFAULT_METRIC} --projections 4 --format {self.fmt},nvfp4 -> "
                 f"{self.out / 'ranking.json'}")
        with self.progress_bar(f"rank ({DEFAULT_METRIC})") as progress:
            ranking = rank_layers(RankRequest(self.probe_path, loaded, [self.fmt, "nvfp4"], metric=DEFAULT_METRIC,
                                              projections=4), progress)
        ranking.save(self.out / "ranking.json")
        plan = build_plan(ranking, budget=parse_budget(self.budget), fmt=self.fmt)
        plan.save(self.out / "plan.json")
        protected = {e: len(plan.protected(e)) for e in ranking.experts}
        self.say(f"plan: the most sensitive layers within {self.budget}: {protected} layers kept in BF16 -> "
                 f"{self.out / 'plan.json'}")
        write_ranking_report(ranking, self.out / "ranking-report", plan=plan)
        return ranking, plan

    def quantize_and_generate(self, loaded, fp, plan, trajectory, prompts) -> None:
        """apply-plan (mse calibration, packed checkpoint); generate from it and from full precision; eval."""
        from sensq.eval import evaluate_fidelity
        from sensq.generate import GenerateRequest, generate
        from sensq.loading import load_model
        from sensq.quant.apply import apply_plan
        from sensq.quant.checkpoint import save_quantized

        with self.progress_bar("calibrate (mse) blocks") as progress:
            _, calibration = apply_plan(loaded, plan, probe_path=self.probe_path, calibrate="mse", progress=progress)
        manifest = save_quantized(loaded, self.out / "quantized", plan=plan, calibration=calibration)
        self.say(f"apply-plan: mse calibration, packed checkpoint -> {self.out / 'quantized'} "
                 f"({manifest['sizes']['disk_bytes'] / 1e6:.2f} MB on disk)")
        runs = self.out / "runs"
        generate(GenerateRequest(fp, trajectory, prompts, runs / "full-precision", label="full precision"))
        quantized = load_model(str(self.out / "quantized"), torch.device("cpu"), torch.float32)
        generate(GenerateRequest(quantized, trajectory, prompts, runs / "quantized", label="quantized (packed)"))
        aggregate = evaluate_fidelity(runs / "quantized", runs / "full-precision")["aggregate"]
        self.say(f"generate + eval: quantized vs full precision: latent NMSE {aggregate['latent_nmse']['mean']:.5f}, "
                 f"PSNR {aggregate['psnr']['mean']:.1f} dB, SSIM {aggregate['ssim']['mean']:.4f}")

    def ablate(self, fp, ranking, trajectory, prompts) -> dict:
        """The standard sets at the budget (one random draw), each deployed as apply-plan deploys it; the report."""
        from sensq.ablate import run_ablation, standard_sets
        from sensq.plan import parse_budget
        from sensq.report.ablation import write_ablation_report

        sets = standard_sets(fp, ranking, self.fmt, top_ks=(), budgets=(parse_budget(self.budget),), random_draws=1)
        with self.progress_bar("ablate") as progress:
            result = run_ablation(fp, trajectory, prompts, sets, self.out / "ablation", fmt=self.fmt,
                                  seeds=self.seeds, calibrate="mse", probe_path=self.probe_path,
                                  progress=None if progress is None else lambda name, done, total: progress(
                                      "protected sets", done, total))
        write_ablation_report(result, self.out / "ablation", [
            f"sensq demo --model {self.model} --format {self.fmt} --prompts {self.n_prompts} --steps {self.steps} "
            f"--budget {self.budget} --seeds {self.seeds} --out {self.out}"])
        self.say(f"ablate: {len(sets)} protected sets x {len(prompts)} prompts x {self.seeds} seeds, each deployed "
                 "as apply-plan deploys it (mse calibration)")
        return result
