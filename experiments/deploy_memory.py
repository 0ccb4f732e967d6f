"""Deployed memory at A14B width: resident bits of the packed layers, a whole deployed expert vs bf16, the
CPU decode cost per forward, peak RSS of `sensq generate` from a packed checkpoint vs full precision, and
the e2e sweep's peak memory with every twin built up front vs one group at a time.

    python experiments/deploy_memory.py --out /tmp/deploy-memory        # ~10 min on 2 cores

Writes results.json and prints the markdown tables of docs/performance.md. The model is
`sensq.models.load_a14b_width` (the real A14B block widths, random weights): what is measured is memory
and time, not quality.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HIF4_ALL = {"schema": "sensq.plan/1", "rules": [
    {"match": "re:(high|low):patch_embedding", "weight": None, "activation": None, "why": "conv entrance"},
    {"match": "re:.*", "weight": "hif4", "activation": "hif4", "why": "everything else"}]}


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _bf16_expert(blocks: int, device: str = "cpu"):
    """The A14B-width model with its high-noise expert alone, in bf16 on ``device``: (model, expert)."""
    from sensq.models import load_a14b_width

    model = load_a14b_width(num_layers=blocks)
    model.pipe.transformer_2 = None
    return model, model.pipe.transformer.to(device=device, dtype=torch.bfloat16)


def _apply_hif4(model, folder: Path) -> None:
    """Every layer but the patch Conv3d to simulation HiF4 W4A4, as apply-plan does (no calibration)."""
    from sensq.plan import Plan
    from sensq.quant.apply import apply_plan

    apply_plan(model, Plan.load(_write_plan(Path(folder) / "plan.json", HIF4_ALL)), force=True)


def resident(folder: Path, blocks: int) -> dict:
    """Bytes per quantized parameter of the deployed layers and of a whole expert, bf16 vs simulation vs deployed."""
    from sensq.models.layers import quantizable_layers
    from sensq.quant.deployed import deploy_, is_deployed

    model, expert = _bf16_expert(blocks)
    bf16 = _module_bytes(expert)
    _apply_hif4(model, folder)
    simulation = _module_bytes(expert)
    deploy_(expert)
    deployed = _module_bytes(expert)
    packed_bits = weights = bias = 0
    for _, layer in quantizable_layers(expert):
        if is_deployed(layer):
            rows, cols = layer.weight_shape
            weights += rows * cols
            packed_bits += 8 * sum(b.numel() * b.element_size() for n, b in layer.named_buffers(recurse=False)
                                   if n != "bias")
            bias += 0 if layer.bias is None else layer.bias.numel() * layer.bias.element_size()
    return {"blocks": blocks, "expert_bf16_bytes": bf16, "expert_simulation_bytes": simulation,
            "expert_deployed_bytes": deployed, "quantized_weights": weights,
            "bits_per_quantized_weight": packed_bits / weights, "bias_bytes": bias}


def _write_plan(path: Path, plan: dict) -> Path:
    path.write_text(json.dumps(plan))
    return path


def decode_cost(rows: int, repeats: int) -> list[dict]:
    """Median forward time of the deployed layer (decode + GEMM) over the simulation layer (GEMM on weight_q)."""
    from sensq.quant import quantize_module
    from sensq.quant.deployed import PackedLinear

    out = []
    for k, n in ((5120, 5120), (5120, 13824), (13824, 5120)):
        for dtype in (torch.float32, torch.bfloat16):
            linear = torch.nn.Linear(k, n).to(dtype)
            sim = quantize_module(linear, "hif4", None)  # weight-only: the comparison is about the weight
            packed = PackedLinear.from_quant(sim)
            x = torch.randn(rows, k, dtype=dtype)
            times = {}
            for name, layer in (("simulation", sim), ("deployed", packed)):
                layer(x)
                samples = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    with torch.no_grad():
                        layer(x)
                    samples.append(time.perf_counter() - start)
                times[name] = sorted(samples)[len(samples) // 2]
            with torch.no_grad():
                assert torch.equal(sim(x), packed(x))
            out.append({"k": k, "n": n, "dtype": str(dtype).replace("torch.", ""), "rows": rows,
                        "simulation_ms": 1e3 * times["simulation"], "deployed_ms": 1e3 * times["deployed"],
                        "ratio": times["deployed"] / times["simulation"]})
            print(out[-1], flush=True)
    return out


def generate_rss(folder: Path, blocks: int) -> dict:
    """Peak RSS of sensq generate on the saved A14B-width model (bf16) vs its packed checkpoint."""
    from sensq.models import load_a14b_width

    model_dir, ckpt = folder / "a14b-width", folder / "a14b-width-hif4"
    if not (model_dir / "model_index.json").exists():
        model = load_a14b_width(num_layers=blocks)
        model.pipe.transformer.to(torch.bfloat16)
        model.pipe.transformer_2.to(torch.bfloat16)
        model.pipe.save_pretrained(model_dir)
    plan = _write_plan(folder / "plan.json", HIF4_ALL)
    sensq = [str(Path(sys.executable).parent / "sensq")]
    if not (ckpt / "manifest.json").exists():
        subprocess.run(sensq + ["apply-plan", str(plan), "--model", str(model_dir), "--dtype", "bf16", "--force",
                                "--out", str(ckpt)], check=True, capture_output=True)
    gen = ["generate", "--dtype", "bf16", "--limit", "1", "--steps", "2", "--no-video",
           "--height", "64", "--width", "64", "--frames", "9"]
    fp = _peak_rss_of_fresh(sensq + gen + ["--model", str(model_dir), "--out", str(folder / "gen-fp")])
    packed = _peak_rss_of_fresh(sensq + gen + ["--model", str(ckpt), "--out", str(folder / "gen-packed")])
    return {"fp_peak_rss_gb": fp, "packed_peak_rss_gb": packed, "blocks": blocks}


def _peak_rss_of_fresh(command: list[str]) -> float:
    """Peak RSS of one command run alone (a fresh grandchild reports its own ru_maxrss)."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1]) / 1e6


E2E_CHILD = """
import sys, resource, torch
from sensq.formats import get_format
from sensq.models import load_a14b_width
from sensq.models.layers import quantizable_layers
from sensq.quant import quantize_module
from sensq.sensitivity.e2e import E2EJob, e2e_scores
from sensq.trajectory import Trajectory
mode = sys.argv[1]
model = load_a14b_width(num_layers=int(sys.argv[2]))
expert = model.pipe.transformer
layers = [n for n, _ in quantizable_layers(expert)]
job = E2EJob(Trajectory(steps=1, guidance=1.0, guidance_2=None).with_resolution(model.default_resolution),
             ["a red circle"], [1], [""])
held = []
if mode == "upfront":  # the sweep as it was before: every dense twin built before scoring
    held = [quantize_module(expert.get_submodule(n), get_format("hif4"), get_format("hif4")) for n in layers]
e2e_scores(model.pipe, expert, layers, job, get_format("hif4"), family=model.family)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def e2e_peak(blocks: int) -> dict:
    out = {}
    for mode in ("upfront", "per-group"):
        result = subprocess.run([sys.executable, "-c", E2E_CHILD, mode, str(blocks)], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(result.stderr[-3000:])
        out[f"{mode}_peak_rss_gb"] = int(result.stdout.strip().splitlines()[-1]) / 1e6
        print(mode, out, flush=True)
    return {"blocks": blocks, **out}


def cuda_memory(folder: Path, blocks: int, device: str = "cuda", tokens_shape=(21, 60, 104)) -> dict:
    """On a GPU: resident bytes and peak ``torch.cuda.max_memory_allocated`` of one A14B-width expert's forward
    at 480x832x81 (32,760 tokens), bf16 full precision vs deployed HiF4 (every Linear but the patch Conv3d)."""
    from sensq.quant.deployed import deploy_

    on_cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    model, expert = _bf16_expert(blocks, device)
    config = expert.config
    frames, height, width = tokens_shape
    generator = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, config.in_channels, frames, height, width, generator=generator),
              "timestep": torch.tensor([500.0]), "encoder_hidden_states": torch.randn(1, 512, config.text_dim,
                                                                                       generator=generator)}
    inputs = {k: v.to(device=device, dtype=torch.bfloat16 if v.is_floating_point() and k != "timestep" else v.dtype)
              for k, v in inputs.items()}

    def measure(label):
        sync()
        if on_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() if on_cuda else _module_bytes(expert)
        start = time.perf_counter()
        with torch.no_grad():
            expert(**inputs, return_dict=False)
        sync()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if on_cuda else None
        print(label, resident, peak, seconds, flush=True)
        return {"resident_bytes": resident, "peak_bytes": peak, "forward_s": seconds}

    out = {"blocks": blocks, "tokens": frames * height * width // 4, "device": torch.cuda.get_device_name()
           if on_cuda else "cpu", "fp": measure("fp")}
    measure("fp warm")
    _apply_hif4(model, folder)
    deploy_(expert)
    out["deployed"] = measure("deployed")
    out["deployed_warm"] = measure("deployed warm")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="resident,decode,generate,e2e")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}"
    steps = {"resident": lambda: resident(args.out, args.blocks),
             "decode": lambda: decode_cost(args.rows, args.repeats),
             "generate": lambda: generate_rss(args.out, args.blocks), "e2e": lambda: e2e_peak(1),
             "cuda": lambda: cuda_memory(args.out, args.blocks),
             "cuda-dry-run": lambda: cuda_memory(args.out, 1, "cpu", (1, 8, 8))}
    for name in args.only.split(","):
        results[name] = steps[name]()
        path.write_text(json.dumps(results, indent=1))
        print(name, json.dumps(results[name], indent=1), flush=True)


if __name__ == "__main__":
    main()
