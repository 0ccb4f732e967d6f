"""Score the embedded trained model on the procedural evaluator: steps, guidance, and W4A4 HiF4.

    python experiments/train_tiny/evaluate.py --model tiny-trained --out /tmp/eval-tiny-trained
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

from sensq.eval import evaluate_procedural
from sensq.generate import GenerateRequest, generate
from sensq.loading import load_model
from sensq.models.wan import WAN22_A14B
from sensq.plan import Plan, Rule
from sensq.prompts import load_prompts
from sensq.quant import dequantize_
from sensq.quant.apply import apply_plan
from sensq.trajectory import Trajectory, get_preset

ENTRANCE = WAN22_A14B.entrance_rule(["high", "low"])  # the family's own entrance rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-trained")
    parser.add_argument("--student", default="tiny-trained-4step")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = load_model(args.model, torch.device("cpu"), torch.float32)
    prompts = load_prompts(None, procedural=True)
    settings = {
        "euler 40 steps, cfg 4": Trajectory(steps=40, scheduler="euler", shift=3.0, guidance=4.0, guidance_2=4.0),
        "euler 40 steps, cfg 1": Trajectory(steps=40, scheduler="euler", shift=3.0, guidance=1.0, guidance_2=1.0),
        "euler 4 steps, cfg 4 (teacher truncated)": Trajectory(steps=4, scheduler="euler", shift=3.0, guidance=4.0,
                                                               guidance_2=4.0),
        "unipc 8 steps, cfg 4": Trajectory(steps=8, scheduler="unipc", shift=3.0, guidance=4.0, guidance_2=4.0),
    }
    plans = {
        "full precision": None,
        "hif4 W4A4, nothing protected": Plan([Rule("re:(high|low):.*", "hif4", "hif4")]),
        "hif4 W4A4, entrance protected": Plan([Rule(ENTRANCE, None, None), Rule("re:(high|low):.*", "hif4", "hif4")]),
    }
    out = args.out or Path(tempfile.mkdtemp())
    rows = []
    for setting, trajectory in settings.items():
        trajectory = trajectory.with_resolution(model.default_resolution)
        for label, plan in plans.items():
            if plan is None and label != "full precision":
                continue
            if plan is not None and not setting.startswith("euler 40 steps, cfg 4"):
                continue
            if plan is not None:
                apply_plan(model, plan)
            try:
                folder = out / f"{setting}-{label}".replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
                generate(GenerateRequest(model, trajectory, prompts, folder, label=label, write_video=False,
                                         plan_digest=label))
            finally:
                dequantize_(model)
            scores = evaluate_procedural(folder)["aggregate"]
            rows.append({"setting": setting, "model": label, **{k: round(v, 3) for k, v in scores.items()}})
    student = load_model(args.student, torch.device("cpu"), torch.float32)
    lightning = get_preset("lightning-4step").with_resolution(student.default_resolution)
    for label, plan in plans.items():
        if plan is not None:
            apply_plan(student, plan)
        try:
            folder = out / f"student-{label}".replace(" ", "_").replace(",", "")
            generate(GenerateRequest(student, lightning, prompts, folder, label=label, write_video=False,
                                     plan_digest=label))
        finally:
            dequantize_(student)
        scores = evaluate_procedural(folder)["aggregate"]
        rows.append({"setting": "student, 4 steps (Lightning schedule), cfg 1", "model": label,
                     **{k: round(v, 3) for k, v in scores.items()}})
    keys = ["subject_consistency", "aesthetic_quality", "imaging_quality", "overall_consistency", "motion_smoothness",
            "average"]
    print("| setting | model | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for row in rows:
        print(f"| {row['setting']} | {row['model']} | " + " | ".join(str(row[k]) for k in keys) + " |")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
