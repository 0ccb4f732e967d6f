"""W4A4 HiF4 on the embedded 'small' model: entrance protected or not, calibration none or mse.

Final-latent NMSE against full precision, mean over the prompts (seed = prompt index).

    python experiments/calibration_ablation.py --prompts 4 --steps 8
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sensq.loading import load_model
from sensq.metrics import nmse
from sensq.plan import Plan, Rule
from sensq.probes.recorder import ProbeRequest, run_probe
from sensq.prompts import load_prompts
from sensq.quant import dequantize_
from sensq.quant.apply import apply_plan
from sensq.trajectory import Trajectory, apply_trajectory, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--format", default="hif4")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    model = load_model(args.model, torch.device("cpu"), torch.float32)
    trajectory = Trajectory(steps=args.steps).with_resolution(model.default_resolution)
    prompts = load_prompts(None, args.prompts)
    experts = model.family.experts(model.pipe)
    everything = [Rule(f"re:{e}:.*", args.format, args.format) for e in experts]
    entrance = model.family.entrance_rule(experts)
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.h5"
        run_probe(ProbeRequest(model, trajectory, prompts, experts, probe))
        apply_trajectory(model.pipe, trajectory)
        reference = [run(model.pipe, p.text, trajectory, seed=p.index) for p in prompts]
        print(f"model {args.model}, {args.format} W4A4, {args.steps} steps, {len(prompts)} prompts")
        print("| entrance protected | calibration | final-latent NMSE | calibration s |")
        print("|---|---|---|---|")
        for protect in (False, True):
            plan = Plan(([Rule(entrance, None, None)] if protect else []) + everything)
            for method in ("none", "mse"):
                started = time.perf_counter()
                apply_plan(model, plan, probe_path=probe, calibrate=method)
                seconds = time.perf_counter() - started
                try:
                    apply_trajectory(model.pipe, trajectory)
                    errors = [nmse(ref, run(model.pipe, p.text, trajectory, seed=p.index))
                              for ref, p in zip(reference, prompts, strict=True)]
                finally:
                    dequantize_(model)
                print(f"| {'yes' if protect else 'no'} | {method} | {sum(errors) / len(errors):.5f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
