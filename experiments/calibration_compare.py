"""Enhanced calibration vs protection: plain, clipping and GPTQ on the whole model, and for the entrance layers
enhanced (GPTQ) vs protected (BF16) vs plain, at equal effective bits.

Probe, rank (mse, HiF4), then deploy every set as apply-plan deploys it (the calibration is each rule's
``calibration`` field, on the probe's captured inputs, block by block) and generate every prompt x seed
(sensq.ablate.run_ablation): latent NMSE vs full precision with 95% bootstrap intervals and the paired
differences; on the procedural models also the evaluator's score.

Sets (W4A4 HiF4 everywhere unless kept):
  plain                       format's own rounding everywhere                       4.5 bits
  mse clip                    clipping search everywhere                             4.5 bits
  gptq                        GPTQ weights (+ mse activation clip) everywhere        4.5 bits
  rotate                      block-diagonal Hadamard rotation (64) everywhere       4.5 bits
  rotate-gptq                 rotation, then GPTQ                                    4.5 bits
  entrance gptq               GPTQ on the entrance only                              4.5 bits
  entrance protected          entrance in BF16                                       B bits
  entrance gptq + ranked B    entrance GPTQ, the ranking's top layers in BF16 up to the entrance's share: B bits
  gptq + entrance protected   entrance BF16, GPTQ elsewhere                          B bits

    python experiments/calibration_compare.py --model tiny-trained-4step --prompts 8 --seeds 4 --out /tmp/calib
"""

import argparse
import json

from setup_run import add_arguments, probe_and_rank, trajectory_flags

from sensq.ablate import ProtectedSet, run_ablation
from sensq.plan import Plan, Rule, build_plan, model_layers, summarize, validate_plan
from sensq.report.ablation import write_ablation_report


def sets_for(model, ranking, fmt: str = "hif4") -> list[ProtectedSet]:
    family = model.family
    experts = family.experts(model.pipe)
    entrance = family.entrance_rule(experts)

    def everything(calibration=None):
        return [Rule(f"re:{e}:.*", fmt, fmt, calibration=calibration) for e in experts]

    protected = Plan([Rule(entrance, None, None)] + everything())
    layers = model_layers(model)
    share = summarize(validate_plan(protected, layers), layers)["total"]["protected_share"]
    ranked = build_plan(ranking, budget=share, fmt=fmt, protect_entrance=False)
    kept = [r for r in ranked.rules if r.weight is None]
    enhanced_ranked = Plan(kept + [Rule(entrance, fmt, fmt, calibration="gptq")] + everything())
    return [
        ProtectedSet("plain", Plan(everything())),
        ProtectedSet("mse clip", Plan(everything("mse"))),
        ProtectedSet("gptq", Plan(everything("gptq"))),
        ProtectedSet("rotate", Plan(everything("rotate"))),
        ProtectedSet("rotate-gptq", Plan(everything("rotate-gptq"))),
        ProtectedSet("entrance gptq", Plan([Rule(entrance, fmt, fmt, calibration="gptq")] + everything())),
        ProtectedSet(f"entrance protected ({share:.0%})", protected),
        ProtectedSet(f"entrance gptq + ranked {share:.0%}", enhanced_ranked),
        ProtectedSet(f"gptq + entrance protected ({share:.0%})",
                     Plan([Rule(entrance, None, None)] + everything("gptq"))),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, "calibration-compare")
    args = parser.parse_args()
    run = probe_and_rank(args)
    result = run_ablation(run.model, run.trajectory, run.prompts, sets_for(run.model, run.ranking),
                          args.out / "ablation", fmt="hif4", seeds=args.seeds, probe_path=run.probe)
    write_ablation_report(result, args.out / "ablation", [
        f"python experiments/calibration_compare.py --model {args.model} --prompts {args.prompts} --seeds "
        f"{args.seeds} {trajectory_flags(args)} --out {args.out}"])
    rows = [{"set": r["set"], "effective_bits": r["effective_bits"], "latent_nmse": r["intervals"]["latent_nmse"],
             **({"procedural": r["intervals"]["procedural"]} if "procedural" in r["intervals"] else {})}
            for r in result["rows"]]
    print(json.dumps({"rows": rows, "comparisons": result.get("comparisons", [])}, indent=1))


if __name__ == "__main__":
    main()
