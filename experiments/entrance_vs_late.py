"""Does protecting the entrance help? End-to-end error of W4A4 plans with equal protected budgets.

For each protected set, quantize every other layer of both experts (W4A4, --format), run the same
prompts and seeds along the trajectory, and measure the final-latent NMSE against full precision.
Sets: none; the entrance (patch_embedding, condition_embedder.*, blocks.0.*); the same parameter
budget spent on the last layers (walking the registration order backwards: proj_out, the last
block, ...); the same budget on the top layers of an mse ranking; the same budget at random.

    python experiments/entrance_vs_late.py --model small --format hif4 --prompts 4
"""

import argparse
import random
import tempfile
from pathlib import Path

import torch

from sensq.ablate import fill_budget
from sensq.loading import load_model
from sensq.metrics import nmse
from sensq.plan import Plan, Rule, model_layers
from sensq.probes.recorder import ProbeRequest, run_probe
from sensq.prompts import load_prompts
from sensq.quant import dequantize_, quantize_
from sensq.sensitivity import RankRequest, rank_layers
from sensq.trajectory import Trajectory, apply_trajectory, run


def plan_for(protected: dict[str, set[str]], fmt: str) -> Plan:
    rules = [Rule(f"{expert}:{name}", None, None) for expert, names in protected.items() for name in sorted(names)]
    return Plan(rules + [Rule(f"re:{expert}:.*", fmt, fmt) for expert in protected])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--format", default="hif4")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = load_model(args.model, torch.device("cpu"), torch.float32)
    trajectory = Trajectory(steps=args.steps).with_resolution(model.default_resolution)
    prompts = load_prompts(None, args.prompts)
    layers = model_layers(model)
    experts = sorted({layer.expert for layer in layers})
    params = {e: {x.name: x.params for x in layers if x.expert == e} for e in experts}
    entrance = {e: {n for n in params[e] if model.family.is_entrance(n)} for e in experts}
    budget = {e: sum(params[e][n] for n in entrance[e]) for e in experts}
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.h5"
        run_probe(ProbeRequest(model, trajectory, prompts, experts, probe))
        ranking = rank_layers(RankRequest(probe, model, [args.format], metric="mse"))
    rng = random.Random(args.seed)
    sets = {
        "none": {e: set() for e in experts},
        "entrance": entrance,
        "late layers, same budget": {e: set(fill_budget(list(reversed(params[e])), params[e], budget[e]))
                                     for e in experts},
        "top mse, same budget": {e: set(fill_budget([x.name for x in ranking.ordered(e)], params[e], budget[e]))
                                 for e in experts},
        "random, same budget": {e: set(fill_budget(rng.sample(list(params[e]), len(params[e])), params[e],
                                                   budget[e])) for e in experts},
    }
    apply_trajectory(model.pipe, trajectory)
    reference = [run(model.pipe, p.text, trajectory, seed=args.seed + p.index) for p in prompts]
    total = {e: sum(params[e].values()) for e in experts}
    print(f"model {args.model}, {args.format} W4A4, {args.steps} steps, {len(prompts)} prompts; entrance budget "
          + ", ".join(f"{e} {budget[e] / total[e]:.1%}" for e in experts))
    print("| protected set | protected share (high / low) | final-latent NMSE (mean over prompts) |")
    print("|---|---|---|")
    for label, protected in sets.items():
        quantize_(model, plan_for(protected, args.format))
        try:
            errors = [nmse(ref, run(model.pipe, p.text, trajectory, seed=args.seed + p.index))
                      for ref, p in zip(reference, prompts, strict=True)]
        finally:
            dequantize_(model)
        share = " / ".join(f"{sum(params[e][n] for n in protected[e]) / total[e]:.1%}" for e in experts)
        print(f"| {label} | {share} | {sum(errors) / len(errors):.5f} |")


if __name__ == "__main__":
    main()
