"""Probe + rank time on a model with A14B layer widths (1 block per expert instead of 40).

Both experts are WanTransformer3DModel with the real A14B config except num_layers=1 (585 M
parameters each: the 5120/13824-wide block, the real condition embedder and proj_out), random
weights, inside the tiny-realshape pipeline (4096-wide text input).

    python experiments/rank_a14b_width.py --prompts 2 --format hif4
"""

import argparse
import tempfile
import time
from pathlib import Path

from sensq.models import load_a14b_width
from sensq.probes.recorder import ProbeRequest, run_probe
from sensq.prompts import load_prompts
from sensq.sensitivity import RankRequest, rank_layers
from sensq.trajectory import get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--format", default="hif4", help="comma-separated, e.g. hif4,mxfp4,nvfp4,int4")
    args = parser.parse_args()
    started = time.perf_counter()
    model = load_a14b_width(num_layers=1)
    params = sum(p.numel() for p in model.pipe.transformer.parameters())
    print(f"built 2 experts of {params / 1e6:.0f} M parameters in {time.perf_counter() - started:.1f} s")
    trajectory = get_preset("lightning-4step").with_resolution(model.default_resolution)
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.h5"
        t0 = time.perf_counter()
        result = run_probe(ProbeRequest(model, trajectory, load_prompts(None, args.prompts), ["high", "low"], probe))
        print(f"probe: {args.prompts} prompts x 4 steps (lightning, no CFG) in {time.perf_counter() - t0:.1f} s, "
              f"{result.file_bytes / 1e6:.0f} MB")
        t0 = time.perf_counter()
        ranking = rank_layers(RankRequest(probe, model, args.format.split(","), metric="mse"))
        seconds = time.perf_counter() - t0
    layers = sum(len(v) for v in ranking.experts.values())
    print(f"rank --metric mse --format {args.format}: {layers} layers of 2 experts in {seconds:.1f} s "
          f"({seconds / layers:.2f} s per layer); top high: {ranking.ordered('high')[0].name}, "
          f"top low: {ranking.ordered('low')[0].name}")


if __name__ == "__main__":
    main()
