"""How often the mse clipping search moves, and what it gains, per expert: every layer in HiF4 W4A4, calibrated
with --calibrate mse on a probe; counts of layers clipped on the 1%-step grid and on the old 5%-step grid (the
same curves read at 1.0, 0.95, ..., 0.5), the NMSE gain per layer, and the curve of the layer that gains most.

    python experiments/clip_curves.py --model tiny-trained-4step --probe probe.h5
"""

import argparse

import torch

from sensq.loading import load_model
from sensq.plan import Plan, Rule
from sensq.quant.apply import apply_plan

OLD_GRID = {1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5}


def _best(curve, grid=None):
    points = [(c, v) for c, v in curve if grid is None or c in grid]
    best = points[0]
    for clip, value in points[1:]:
        if value < best[1]:
            best = (clip, value)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-trained-4step")
    parser.add_argument("--probe", required=True)
    parser.add_argument("--format", default="hif4")
    args = parser.parse_args()
    model = load_model(args.model, torch.device("cpu"), torch.float32)
    experts = model.family.experts(model.pipe)
    plan = Plan([Rule(f"re:{e}:.*", args.format, args.format) for e in experts])
    _, calibration = apply_plan(model, plan, probe_path=args.probe, calibrate="mse")
    for expert, layers in calibration.items():
        for operand in ("weight", "act"):
            curves = {name: getattr(c, f"{operand}_curve") for name, c in layers.items()}
            curves = {name: curve for name, curve in curves.items() if curve}
            new = sum(_best(curve)[0] < 1 for curve in curves.values())
            old = sum(_best(curve, OLD_GRID)[0] < 1 for curve in curves.values())
            gains = sorted(((curve[0][1] - _best(curve)[1]) / curve[0][1], name) for name, curve in curves.items())
            top_gain, top = gains[-1]
            print(f"{expert} {operand}: {len(curves)} layers, clipped {new} (1% grid) vs {old} (5% grid); NMSE gain "
                  f"median {gains[len(gains) // 2][0]:.2%}, max {top_gain:.2%} ({top})")
            print("    " + " ".join(f"{clip:g}:{value:.5f}" for clip, value in curves[top][:12]))


if __name__ == "__main__":
    main()
