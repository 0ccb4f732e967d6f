"""What do timestep-range rules buy? Layers kept in BF16 in the early steps only, against keeping them at every
step and against none.

Probe, rank (mse, HiF4), then deploy every set as apply-plan deploys it and generate every prompt x seed
(sensq.ablate.run_ablation): latent NMSE vs full precision with 95% bootstrap intervals and the paired
differences; on the procedural models also the evaluator's score. Besides the resident bits, each set's
quantized share of the GEMM work is reported: parameters x steps run quantized over parameters x steps run
(a layer kept in BF16 at a step does that step's work in BF16).

Sets (W4A4 HiF4 unless kept):
  none                                   everything quantized at every step
  entrance, every step                   the entrance in BF16
  entrance, step 0 only                  the entrance in BF16 at the first step, quantized after
  everything at step 0                   the whole model in BF16 at the first step, quantized after
  ranked B, every step                   sensq plan --budget B (no forced entrance)
  ranked B, step 0 only                  the same layers in BF16 at the first step only
  planned B for step 0                   sensq plan --budget B --protect-steps 0-0: layers chosen by their
                                         sensitivity at the first step, in BF16 there only
  everything at the last step            the whole model in BF16 at the last step
  planned B for the last step            sensq plan --budget B --protect-steps L-L (L: the last step)

    python experiments/step_ranges.py --model tiny-trained-4step --prompts 8 --seeds 4 --out /tmp/steps
"""

import argparse
import json

from setup_run import add_arguments, probe_and_rank, trajectory_flags

from sensq.ablate import ProtectedSet, run_ablation
from sensq.plan import Plan, Rule, build_plan, model_layers, validate_plan
from sensq.report.ablation import write_ablation_report
from sensq.trajectory import Trajectory, apply_trajectory, plan_steps


def ranged(plan: Plan, steps: tuple[int, int]) -> Plan:
    """``plan`` with its BF16 rules limited to ``steps``."""
    return Plan([Rule(r.match, r.weight, r.activation, r.why, r.calibration, steps) if r.weight is None else r
                 for r in plan.rules])


def quantized_work_share(model, plan: Plan, trajectory: Trajectory) -> float:
    """Parameters x steps run with a quantized weight over parameters x steps run, along ``trajectory``."""
    table = validate_plan(plan, model_layers(model))
    apply_trajectory(model.pipe, trajectory)
    steps = plan_steps(model.pipe, model.family, trajectory)
    done = total = 0
    for step in steps:
        for row in (r for r in table if r.expert == step.expert):
            phase = next((p for p in row.step_ranges if p.covers(step.index, step.timestep / 1000)), None)
            weight = phase.weight if phase is not None else row.weight
            total += row.params
            done += row.params if weight is not None else 0
    return done / total


def sets_for(model, ranking, budget: float, steps: int, fmt: str = "hif4") -> list[ProtectedSet]:
    experts = model.family.experts(model.pipe)
    entrance = model.family.entrance_rule(experts)
    everything = [Rule(f"re:{e}:.*", fmt, fmt) for e in experts]
    kept = build_plan(ranking, budget=budget, fmt=fmt, protect_entrance=False)
    last = steps - 1
    return [
        ProtectedSet("none", Plan(everything)),
        ProtectedSet("entrance, every step", Plan([Rule(entrance, None, None)] + everything)),
        ProtectedSet("entrance, step 0 only", Plan([Rule(entrance, None, None, steps=(0, 0))] + everything)),
        ProtectedSet("everything at step 0", Plan([Rule(f"re:({'|'.join(experts)}):.*", None, None, steps=(0, 0))]
                                                  + everything)),
        ProtectedSet(f"ranked {budget:.0%}, every step", kept),
        ProtectedSet(f"ranked {budget:.0%}, step 0 only", ranged(kept, (0, 0))),
        ProtectedSet(f"planned {budget:.0%} for step 0",
                     build_plan(ranking, budget=budget, fmt=fmt, protect_entrance=False, protect_steps=(0, 0))),
        ProtectedSet("everything at the last step",
                     Plan([Rule(f"re:({'|'.join(experts)}):.*", None, None, steps=(last, last))] + everything)),
        ProtectedSet(f"planned {budget:.0%} for the last step",
                     build_plan(ranking, budget=budget, fmt=fmt, protect_entrance=False, protect_steps=(last, last))),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, "step-ranges")
    parser.add_argument("--budget", type=float, default=0.1)
    args = parser.parse_args()
    run = probe_and_rank(args)
    sets = sets_for(run.model, run.ranking, args.budget, run.trajectory.steps)
    shares = {s.name: quantized_work_share(run.model, s.plan, run.trajectory) for s in sets}
    result = run_ablation(run.model, run.trajectory, run.prompts, sets, args.out / "ablation", fmt="hif4",
                          seeds=args.seeds)
    write_ablation_report(result, args.out / "ablation", [
        f"python experiments/step_ranges.py --model {args.model} --prompts {args.prompts} --seeds {args.seeds} "
        f"{trajectory_flags(args)} --budget {args.budget} --out {args.out}"])
    rows = [{"set": r["set"], "effective_bits": r["effective_bits"], "quantized_work": shares[r["set"]],
             "latent_nmse": r["intervals"]["latent_nmse"],
             **({"procedural": r["intervals"]["procedural"]} if "procedural" in r["intervals"] else {})}
            for r in result["rows"]]
    (args.out / "summary.json").write_text(json.dumps({"rows": rows, "comparisons": result["comparisons"]}, indent=1))
    print(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
