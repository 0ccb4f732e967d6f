"""Can the procedural evaluator resolve one layer's quantization? Leave-one-in sets (one layer in W4A4 HiF4, the
rest in full precision) for the e2e ranking's most and least sensitive layers, every prompt x seed: the
latent NMSE and the evaluator's score against full precision, both with paired 95% intervals, and the rank
correlation of the two over those layers (the check of e2e against the evaluator that `sensq rank --validate`
cannot make when the evaluator cannot tell the layers apart).

    python experiments/evaluator_resolution.py --model tiny-trained-4step --layers 4 --prompts 8 --seeds 4 \\
        --out /tmp/evaluator
"""

import argparse
import json
from pathlib import Path

import torch
from scipy.stats import spearmanr

from sensq.ablate import ProtectedSet, run_ablation
from sensq.loading import load_model
from sensq.plan import Plan, Rule
from sensq.probes.recorder import ProbeRequest, run_probe
from sensq.prompts import load_prompts
from sensq.sensitivity import RankRequest, rank_layers
from sensq.trajectory import get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-trained-4step")
    parser.add_argument("--preset", default="lightning-4step")
    parser.add_argument("--layers", type=int, default=4, help="most and least sensitive layers per expert")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("evaluator-resolution"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model, torch.device("cpu"), torch.float32)
    trajectory = get_preset(args.preset).with_resolution(model.default_resolution)
    prompts = load_prompts(None, args.prompts, procedural=model.procedural)
    probe = args.out / "probe.h5"
    experts = model.family.experts(model.pipe)
    run_probe(ProbeRequest(model, trajectory, prompts, experts, probe, resume=probe.exists()))
    ranking = rank_layers(RankRequest(probe, model, ["hif4"], metric="e2e", limit=min(args.prompts, 2)))
    ranking.save(args.out / "e2e.json")
    sets, e2e_value = [], {}
    for expert in experts:
        ordered = ranking.ordered(expert, "hif4")
        for layer in ordered[:args.layers] + ordered[-args.layers:]:
            name = f"{expert}:{layer.name}"
            e2e_value[name] = layer.value["hif4"]
            sets.append(ProtectedSet(name, Plan([Rule(name, "hif4", "hif4")]
                                               + [Rule(f"re:{e}:.*", None, None) for e in experts])))
    everything = Plan([Rule(f"re:{e}:.*", "hif4", "hif4") for e in experts])
    result = run_ablation(model, trajectory, prompts, sets + [ProtectedSet("every layer", everything)],
                          args.out / "ablation", fmt="hif4", seeds=args.seeds)
    versus_fp = {c["a"]: c for c in result["comparisons"] if c["b"] == "full precision" and c["metric"] == "procedural"}
    rows = []
    for row in result["rows"]:
        drop = versus_fp.get(row["set"])
        rows.append({"set": row["set"], "e2e_probe_nmse": e2e_value.get(row["set"]),
                     "latent_nmse": row["intervals"]["latent_nmse"],
                     "evaluator_minus_fp": drop and {k: drop[k] for k in ("mean", "low", "high", "significant")}})
    layers = [r for r in rows if r["e2e_probe_nmse"] is not None]
    rho = spearmanr([r["e2e_probe_nmse"] for r in layers], [-r["evaluator_minus_fp"]["mean"] for r in layers])
    summary = {"rows": rows, "resolved": sum(r["evaluator_minus_fp"]["significant"] for r in layers),
               "layers": len(layers), "spearman_e2e_vs_evaluator_drop": float(rho.statistic),
               "spearman_p": float(rho.pvalue)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
