"""Peak memory of grad-e2e with and without the memory-bounded path (--checkpoint), each mode in
a fresh process, on an embedded model at a resolution where activations dominate the weights.

    python experiments/signals/memory.py --model tiny-deep-4step --size 256 --frames 33
"""

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, time, torch
from sensq.formats import get_format
from sensq.loading import load_model
from sensq.prompts import load_prompts
from sensq.sensitivity.e2e import E2EJob
from sensq.sensitivity.propagated import linearize
from sensq.trajectory import get_preset
model_name, size, frames = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
checkpoint = sys.argv[4] == "1"
m = load_model(model_name, torch.device("cpu"), torch.float32)
t = get_preset("lightning-4step").with_resolution((size, size, frames))
job = E2EJob(t, [load_prompts(None, 1, procedural=m.procedural)[0].text], [0], [""])
experts = {e: m.family.expert_module(m.pipe, e) for e in m.family.experts(m.pipe)}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
result = linearize(m.pipe, experts, job, get_format("hif4"), family=m.family, projections=2, checkpoint=checkpoint)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": time.perf_counter() - started, "peak_mb": peak / 1024, "before_mb": before / 1024,
                  "scores": {e: {n: v[0] for n, v in s.items()} for e, s in result.scores.items()}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-deep-4step")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=33)
    args = parser.parse_args()
    runs = {}
    for label, checkpoint in (("full graph", "0"), ("checkpointed", "1")):
        out = subprocess.run([sys.executable, "-c", CHILD, args.model, str(args.size), str(args.frames), checkpoint],
                             capture_output=True, text=True, check=True)
        runs[label] = json.loads(out.stdout.strip().splitlines()[-1])
    from scipy.stats import spearmanr

    full = runs["full graph"]["scores"]
    print(f"{args.model} at {args.size}x{args.size}x{args.frames}, lightning 4 steps, 1 prompt, K=2")
    print("| mode | peak RSS MB (model loaded: MB) | seconds | Spearman vs full graph |\n|---|---|---|---|")
    for label, run in runs.items():
        a = [full[e][n] for e in full for n in full[e]]
        b = [run["scores"][e][n] for e in full for n in full[e]]
        print(f"| {label} | {run['peak_mb']:.0f} ({run['before_mb']:.0f}) | {run['seconds']:.1f} | "
              f"{spearmanr(a, b).statistic:.3f} |")


if __name__ == "__main__":
    main()
