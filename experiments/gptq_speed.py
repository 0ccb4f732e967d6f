"""How long GPTQ takes per layer at A14B widths: one [out, in] weight rounded to HiF4 by GPTQ on `--rows` inputs,
timed (after a warm-up on a small layer), against round-to-nearest packing of the same weight.

    python experiments/gptq_speed.py --device cpu --shapes 5120x5120
    python experiments/gptq_speed.py --device cuda --shapes 5120x5120,13824x5120,5120x13824   # A14B's three shapes
"""

import argparse
import json
import time

import torch

from sensq.formats import get_format, pack
from sensq.quant.gptq import gptq_pack


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="5120x5120", help="comma-separated OUTxIN")
    parser.add_argument("--rows", type=int, default=4096, help="calibration rows (sensq's default cap)")
    parser.add_argument("--format", default="hif4")
    args = parser.parse_args()
    device = torch.device(args.device)
    spec = get_format(args.format)
    generator = torch.Generator().manual_seed(0)
    gptq_pack(torch.randn(64, 128).to(device), torch.randn(256, 128).to(device), spec)  # warm-up
    results = []
    for shape in args.shapes.split(","):
        out_features, in_features = (int(v) for v in shape.split("x"))
        weight = (torch.randn(out_features, in_features, generator=generator) * 0.02).to(device, torch.bfloat16)
        rows = torch.randn(args.rows, in_features, generator=generator).to(device)
        _sync(device)
        start = time.perf_counter()
        pack(weight.float(), spec)
        _sync(device)
        rounded = time.perf_counter() - start
        start = time.perf_counter()
        gptq_pack(weight.float(), rows, spec, dtype=torch.bfloat16)
        _sync(device)
        results.append({"shape": shape, "rows": args.rows, "device": str(device), "gptq_s": time.perf_counter() - start,
                        "round_to_nearest_s": rounded})
        print(json.dumps(results[-1]))
    if device.type == "cuda":
        print("card:", torch.cuda.get_device_name(device))


if __name__ == "__main__":
    main()
