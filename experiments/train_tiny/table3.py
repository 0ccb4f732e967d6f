"""The method's Table III shape on the embedded trained teacher: for 4, 8, 20 and 40 steps, the original
(40-step) full precision, the same-step full precision, and W4A4 HiF4 with the entrance protected.

    python experiments/train_tiny/table3.py --out /tmp/table3
"""

import argparse
import tempfile
from pathlib import Path

import torch

from sensq.eval import evaluate_procedural
from sensq.eval.procedural import DIMENSIONS
from sensq.generate import GenerateRequest, generate
from sensq.loading import load_model
from sensq.models.wan import WAN22_A14B
from sensq.plan import Plan, Rule
from sensq.prompts import load_prompts
from sensq.quant import dequantize_
from sensq.quant.apply import apply_plan
from sensq.trajectory import Trajectory

ENTRANCE = WAN22_A14B.entrance_rule(["high", "low"])  # the family's own entrance rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-trained")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp())
    model = load_model(args.model, torch.device("cpu"), torch.float32)
    prompts = load_prompts(None, procedural=True)
    plan = Plan([Rule(ENTRANCE, None, None), Rule("re:(high|low):.*", "hif4", "hif4")])

    def scores(steps: int, quantized: bool) -> dict:
        trajectory = Trajectory(steps=steps, scheduler="euler", shift=3.0, guidance=4.0,
                                guidance_2=4.0).with_resolution(model.default_resolution)
        if quantized:
            apply_plan(model, plan)
        try:
            folder = out / f"{steps}-{'hif4' if quantized else 'fp'}"
            generate(GenerateRequest(model, trajectory, prompts, folder, write_video=False,
                                     plan_digest="hif4-entrance" if quantized else None))
        finally:
            dequantize_(model)
        return evaluate_procedural(folder)["aggregate"]

    original = scores(40, False)
    keys = list(DIMENSIONS) + ["average"]
    print("| steps | model | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    print("| 40 | original full precision | " + " | ".join(f"{original[k]:.3f}" for k in keys) + " |")
    for steps in (4, 8, 20, 40):
        for quantized, label in ((False, "same-step full precision"), (True, "W4A4 HiF4, entrance protected")):
            row = scores(steps, quantized)
            print(f"| {steps} | {label} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
