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
from pathlib import Path

import torch

from sensq.ablate import ProtectedSet, run_ablation, write_ablation_report
from sensq.loading import load_model
from sensq.plan import Plan, Rule, build_plan, model_layers, summarize, validate_plan
from sensq.probes.recorder import ProbeRequest, run_probe
from sensq.prompts import load_prompts
from sensq.sensitivity import RankRequest, rank_layers
from sensq.trajectory import Trajectory, get_preset


def sets_for(model, ranking, fmt: str = "hif4") -> list[ProtectedSet]:
    family = model.adapter
    experts = family.experts(model.pipe)
    entrance = f"re:({'|'.join(experts)}):({'|'.join(family.entrance)})"

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
    parser.add_argument("--model", default="tiny-trained-4step")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="UniPC steps with CFG (without --preset)")
    parser.add_argument("--preset", default=None, help="a trajectory preset instead (e.g. lightning-4step)")
    parser.add_argument("--out", type=Path, default=Path("calibration-compare"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model, torch.device("cpu"), torch.float32)
    trajectory = (get_preset(args.preset) if args.preset else Trajectory(steps=args.steps)).with_resolution(
        model.default_resolution)
    prompts = load_prompts(None, args.prompts, procedural=model.procedural)
    probe = args.out / "probe.h5"
    run_probe(ProbeRequest(model, trajectory, prompts, model.adapter.experts(model.pipe), probe,
                           resume=probe.exists()))
    ranking = rank_layers(RankRequest(probe, model, ["hif4"]))
    ranking.save(args.out / "ranking.json")
    result = run_ablation(model, trajectory, prompts, sets_for(model, ranking), args.out / "ablation", fmt="hif4",
                          seeds=args.seeds, probe_path=probe)
    write_ablation_report(result, args.out / "ablation", [
        f"python experiments/calibration_compare.py --model {args.model} --prompts {args.prompts} --seeds "
        f"{args.seeds} --steps {args.steps}{f' --preset {args.preset}' if args.preset else ''} --out {args.out}"])
    rows = [{"set": r["set"], "effective_bits": r["effective_bits"], "latent_nmse": r["intervals"]["latent_nmse"],
             **({"procedural": r["intervals"]["procedural"]} if "procedural" in r["intervals"] else {})}
            for r in result["rows"]]
    print(json.dumps({"rows": rows, "comparisons": result.get("comparisons", [])}, indent=1))


if __name__ == "__main__":
    main()
