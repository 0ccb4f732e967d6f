"""What probe -> rank -> plan costs at Wan2.2-T2V-A14B's layer widths, in generations, on the CPU.

Both experts are WanTransformer3DModel with the real A14B config except num_layers (random weights, fp32,
the tiny-realshape pipeline's resolution), Lightning 4 steps. Measured: one generation; the probe; rank by
mse; rank by grad-e2e (per prompt, at K projections); leave-one-in e2e per layer (a few layers, timed per
layer); one round of plan --search e2e. Everything is then expressed in generations of the same model, the
unit the extrapolation to a whole A14B expert on a GPU uses (docs/sensitivity.md).

    python experiments/signals/a14b_width.py --blocks 2 --prompts 1 --projections 2
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sensq.formats import get_format
from sensq.models import load_a14b_width
from sensq.plan import model_layers
from sensq.probes.recorder import ProbeRequest, run_probe
from sensq.prompts import load_prompts
from sensq.sensitivity import RankRequest, rank_layers
from sensq.sensitivity.e2e import E2EJob, e2e_scores
from sensq.sensitivity.search import search_protected
from sensq.trajectory import apply_trajectory, get_preset, run


def _timed(label, function):
    started = time.perf_counter()
    value = function()
    seconds = time.perf_counter() - started
    return value, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--projections", type=int, default=2)
    parser.add_argument("--e2e-layers", type=int, default=4, help="layers of the e2e sweep to time")
    args = parser.parse_args()
    model = load_a14b_width(num_layers=args.blocks)
    layers = len(model_layers(model))
    params = sum(p.numel() for p in model.pipe.transformer.parameters())
    trajectory = get_preset("lightning-4step").with_resolution(model.default_resolution)
    prompts = load_prompts(None, args.prompts)
    job = E2EJob(trajectory, [p.text for p in prompts], [p.index for p in prompts], [""] * len(prompts))
    apply_trajectory(model.pipe, trajectory)
    with torch.no_grad():
        run(model.pipe, job.prompts[0], trajectory, seed=0)  # warm-up
        _, generation = _timed("generation", lambda: run(model.pipe, job.prompts[0], trajectory, seed=0))
    rows = [("one generation (4 steps, both experts)", generation, 1.0)]
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.h5"
        _, seconds = _timed("probe", lambda: run_probe(ProbeRequest(model, trajectory, prompts, ["high", "low"],
                                                                     probe)))
        rows.append((f"probe, {args.prompts} prompt(s)", seconds, seconds / generation))
        _, seconds = _timed("mse", lambda: rank_layers(RankRequest(probe, model, ["hif4"], metric="mse")))
        rows.append((f"rank --metric mse ({layers} layers)", seconds, seconds / generation))
        _, seconds = _timed("grad", lambda: rank_layers(RankRequest(probe, model, ["hif4"], metric="grad-e2e",
                                                                     projections=args.projections)))
        rows.append((f"rank --metric grad-e2e, K={args.projections}, {args.prompts} prompt(s)", seconds,
                     seconds / generation))
    expert = model.family.expert_module(model.pipe, "low")
    names = [info.name for info in model_layers(model) if info.expert == "low"][: args.e2e_layers]
    _, seconds = _timed("e2e", lambda: e2e_scores(model.pipe, expert, names, job, get_format("hif4"),
                                                  family=model.family))
    per_layer = (seconds - generation * len(prompts)) / len(names)  # minus the reference generation
    rows.append((f"e2e leave-one-in, per layer, {args.prompts} prompt(s)", per_layer, per_layer / generation))
    _, seconds = _timed("search", lambda: search_protected(model, job, get_format("hif4"), 0.1, rounds=1,
                                                           projections=args.projections))
    rows.append((f"plan --search e2e, 1 round, K={args.projections}, {args.prompts} prompt(s)", seconds,
                 seconds / generation))
    print(f"A14B widths, {args.blocks} block(s) per expert ({params / 1e6:.0f} M parameters each), {layers} layers, "
          f"{torch.get_num_threads()} torch threads")
    print("| work | seconds | generations |\n|---|---|---|")
    for label, seconds, ratio in rows:
        print(f"| {label} | {seconds:.1f} | {ratio:.1f} |")


if __name__ == "__main__":
    main()
