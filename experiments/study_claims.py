"""The study's calibration claims on the embedded few-step student: calibrate on its own few-step trajectory or
on the teacher's long one, experts independently or sequentially.

One plan (the entrance in BF16, W4A4 HiF4 elsewhere, as the study deploys it), deployed as apply-plan deploys
it and generated for every prompt x seed along the student's own trajectory (Lightning 4 steps, Euler, no CFG):

  no calibration          the format's own rule
  own 4-step probe        calibrated on the student's own trajectory, each expert on its own inputs (the study)
  teacher 40-step probe   calibrated on the teacher's 40-step UniPC trajectory (--probe-from-another-model)
  sequential experts      own probe; the low-noise expert re-probed after the high-noise one is quantized
  pooled experts          own probe; every expert calibrated on both experts' inputs pooled (--pooled-experts)

Latent NMSE vs the student's full-precision generation, 95% bootstrap intervals, every pair compared per
generation (paired bootstrap); on the procedural models also the evaluator's score.

    python experiments/study_claims.py --student tiny-trained-4step --teacher tiny-trained --prompts 8 --seeds 4 \\
        --out /tmp/claims
"""

import argparse
import json
from pathlib import Path

import torch

from sensq.ablate import ProtectedSet, compare_rows, run_ablation
from sensq.loading import load_model
from sensq.plan import Plan, Rule
from sensq.probes.recorder import ProbeRequest, run_probe
from sensq.prompts import load_prompts
from sensq.trajectory import Trajectory, get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="tiny-trained-4step")
    parser.add_argument("--teacher", default="tiny-trained")
    parser.add_argument("--teacher-steps", type=int, default=40)
    parser.add_argument("--calibrate", default="mse")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("study-claims"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    student = load_model(args.student, torch.device("cpu"), torch.float32)
    teacher = load_model(args.teacher, torch.device("cpu"), torch.float32)
    few = get_preset("lightning-4step").with_resolution(student.default_resolution)
    long = Trajectory(steps=args.teacher_steps).with_resolution(teacher.default_resolution)
    prompts = load_prompts(None, args.prompts, procedural=student.procedural)
    experts = student.family.experts(student.pipe)
    own, taught = args.out / "student-4step.h5", args.out / f"teacher-{args.teacher_steps}step.h5"
    run_probe(ProbeRequest(student, few, prompts, experts, own, resume=own.exists()))
    run_probe(ProbeRequest(teacher, long, prompts, experts, taught, resume=taught.exists()))
    del teacher
    entrance = student.family.entrance_rule(experts)
    plan = Plan([Rule(entrance, None, None)] + [Rule(f"re:{e}:.*", "hif4", "hif4") for e in experts])
    variants = [
        ("no calibration", {"calibrate": "none"}),
        ("own 4-step probe", {"calibrate": args.calibrate, "probe_path": own}),
        (f"teacher {args.teacher_steps}-step probe", {"calibrate": args.calibrate, "probe_path": taught,
                                                       "probe_from_another_model": True}),
        ("sequential experts", {"calibrate": args.calibrate, "probe_path": own, "sequential_experts": True}),
        ("pooled experts", {"calibrate": args.calibrate, "probe_path": own, "pooled_experts": True}),
    ]
    rows = []
    for name, options in variants:
        result = run_ablation(student, few, prompts, [ProtectedSet(name, plan)],
                              args.out / name.replace(" ", "-"), fmt="hif4", seeds=args.seeds, **options)
        rows += result["rows"]
    comparisons = compare_rows(rows)
    summary = {"command": f"python experiments/study_claims.py --student {args.student} --teacher {args.teacher} "
                          f"--teacher-steps {args.teacher_steps} --calibrate {args.calibrate} --prompts "
                          f"{args.prompts} --seeds {args.seeds} --out {args.out}",
               "rows": [{"set": r["set"], "intervals": r["intervals"]} for r in rows], "comparisons": comparisons}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
