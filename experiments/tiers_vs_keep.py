"""Does a tier plan (HiF4 / FP8 / BF16 per layer) beat keep-or-quantize (HiF4 / BF16) at equal bits?

Probe, rank with both formats, then build at the same effective bits per weight (per expert):
keep-or-quantize (sensq plan --budget: HiF4 everywhere, the ranking's most sensitive layers kept in BF16,
entrance forced as sensq plan does, and the same without forcing) and the tier plan (sensq plan --tiers
hif4,fp8_e4m3,bf16 --bits B, exact search). Every plan is deployed as apply-plan deploys it and generated
for every prompt x seed (sensq.ablate.run_ablation): latent NMSE vs full precision with 95% bootstrap
intervals, the paired differences and, on the procedural models, the evaluator score.

    python experiments/tiers_vs_keep.py --model tiny-trained-4step --bits 6 --prompts 4 --seeds 2 --out /tmp/tiers
"""

import argparse
import json
from pathlib import Path

import torch

from sensq.ablate import ProtectedSet, run_ablation
from sensq.loading import load_model
from sensq.plan import build_plan
from sensq.plan.tiers import build_tier_plan, parse_tiers
from sensq.probes.recorder import ProbeRequest, run_probe
from sensq.prompts import load_prompts
from sensq.report.ablation import write_ablation_report
from sensq.sensitivity import RankRequest, rank_layers
from sensq.trajectory import Trajectory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-trained-4step")
    parser.add_argument("--bits", type=float, default=6.0)
    parser.add_argument("--tiers", default="hif4,fp8_e4m3,bf16")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("tiers-vs-keep"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model, torch.device("cpu"), torch.float32)
    trajectory = Trajectory(steps=args.steps).with_resolution(model.default_resolution)
    prompts = load_prompts(None, args.prompts, procedural=model.procedural)
    probe = args.out / "probe.h5"
    run_probe(ProbeRequest(model, trajectory, prompts, model.family.experts(model.pipe), probe,
                           resume=probe.exists()))
    ranking = rank_layers(RankRequest(probe, model, ["hif4", "fp8_e4m3"], metric="mse"))
    ranking.save(args.out / "ranking.json")
    share = (args.bits - 4.5) / (16 - 4.5)  # HiF4 is 4.5 bits where in_features is a multiple of 64
    sets = [
        ProtectedSet(f"keep-or-quantize {share:.0%} (entrance forced)", build_plan(ranking, budget=share)),
        ProtectedSet(f"keep-or-quantize {share:.0%} (ranked)", build_plan(ranking, budget=share,
                                                                          protect_entrance=False)),
        ProtectedSet(f"tiers {args.tiers} at {args.bits:g} bits", build_tier_plan(ranking, parse_tiers(args.tiers),
                                                                                 args.bits)),
    ]
    result = run_ablation(model, trajectory, prompts, sets, args.out / "ablation", fmt="hif4", seeds=args.seeds)
    write_ablation_report(result, args.out / "ablation", [f"python experiments/tiers_vs_keep.py --model {args.model} "
                                                          f"--bits {args.bits:g} --prompts {args.prompts} --seeds "
                                                          f"{args.seeds} --out {args.out}"])
    rows = [{"set": r["set"], "effective_bits": r["effective_bits"], "latent_nmse": r["intervals"]["latent_nmse"],
             **({"procedural": r["intervals"]["procedural"]} if "procedural" in r["intervals"] else {})}
            for r in result["rows"]]
    comparisons = [c for c in result.get("comparisons", []) if "tiers" in c["a"] + c["b"]]
    print(json.dumps({"rows": rows, "comparisons": comparisons}, indent=1))


if __name__ == "__main__":
    main()
