"""Distill the two-expert teacher into a 4-step student (the embedded 'tiny-trained-4step').

Method: trajectory (knowledge) distillation per interval, the one-shot form of progressive
distillation (Luhman & Luhman 2021; Salimans & Ho 2022), chosen over DMD because DMD needs a second
"fake score" network trained alongside and many more steps than this CPU affords, and over
consistency distillation because the target schedule is fixed (4 Lightning timesteps), which makes
direct interval matching simpler and exact in what it asks for. The teacher (guidance 4, 10 Euler
substeps per interval) solves the probability-flow ODE between the student's timesteps
t = 1000, 937.5, 833.3, 625, 0 (the Lightning schedule: Euler, shift 5); the student learns, in one
Euler step per interval and without CFG (guidance is baked in, as in Wan2.2-Lightning), to land where
the teacher lands. The high-noise student expert learns the intervals starting at t >= 875, the
low-noise one the others. Both start from the teacher's weights.

    python experiments/train_tiny/distill.py --teacher /tmp/tiny-trained/pipeline --out /tmp/tiny-student \
        --paths 512 --minutes 8
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sensq.eval.procedural import all_scenes

SIGMAS = [1.0, 0.9375, 0.8333333, 0.625, 0.0]  # the Lightning 4-step schedule (shift 5 of 1, .75, .5, .25)
BOUNDARY = 0.875


def log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


@torch.no_grad()
def teacher_velocity(pipe, x, sigma, text, empty, guidance):
    expert = pipe.transformer if sigma >= BOUNDARY else pipe.transformer_2
    t = torch.full((x.shape[0],), sigma * 1000.0)
    cond = expert(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    uncond = expert(hidden_states=x, timestep=t, encoder_hidden_states=empty.expand_as(text), return_dict=False)[0]
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def teacher_pool(pipe, paths: int, substeps: int, guidance: float, seed: int):
    """States of the teacher's ODE at the student's sigmas: ``[interval][path]`` start and end."""
    rng = np.random.default_rng(seed)
    scenes = all_scenes()
    prompts = [scenes[i].prompt for i in rng.integers(0, len(scenes), paths)]
    text = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512)[0]
    empty = pipe.encode_prompt([""], do_classifier_free_guidance=False, max_sequence_length=512)[0]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((paths, 16, 3, 4, 4), generator=generator)
    states = [x.clone()]
    for a, b in zip(SIGMAS[:-1], SIGMAS[1:], strict=True):
        grid = np.linspace(a, b, substeps + 1)
        for s, s_next in zip(grid[:-1], grid[1:], strict=True):
            for start in range(0, paths, 128):
                chunk = slice(start, start + 128)
                v = teacher_velocity(pipe, x[chunk], s, text[chunk], empty, guidance)
                x[chunk] = x[chunk] + (s_next - s) * v
        states.append(x.clone())
    return states, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--paths", type=int, default=512)
    parser.add_argument("--substeps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "distill_log.jsonl"
    log_path.unlink(missing_ok=True)
    started = time.time()
    pipe = WanPipeline.from_pretrained(str(args.teacher))
    states, text = teacher_pool(pipe, args.paths, args.substeps, args.guidance, args.seed)
    log(log_path, {"phase": "teacher pool", "paths": args.paths, "seconds": round(time.time() - started, 1)})
    students = {"high": pipe.transformer, "low": pipe.transformer_2}  # start from the teacher, train in place
    intervals = {"high": [k for k in range(4) if SIGMAS[k] >= BOUNDARY],
                 "low": [k for k in range(4) if SIGMAS[k] < BOUNDARY]}
    generator = torch.Generator().manual_seed(args.seed + 1)
    for name, student in students.items():
        optimizer = torch.optim.AdamW(student.parameters(), lr=2e-4, weight_decay=0.0)
        student.train()
        phase_start, step, window = time.time(), 0, []
        while time.time() - phase_start < args.minutes * 60 / 2:
            k = intervals[name][int(torch.randint(0, len(intervals[name]), (1,), generator=generator))]
            index = torch.randint(0, args.paths, (64,), generator=generator)
            x, target = states[k][index], states[k + 1][index]
            t = torch.full((64,), SIGMAS[k] * 1000.0)
            v = student(hidden_states=x, timestep=t, encoder_hidden_states=text[index], return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(x + (SIGMAS[k + 1] - SIGMAS[k]) * v, target) / (
                SIGMAS[k + 1] - SIGMAS[k]) ** 2  # the loss on the velocity
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            step += 1
            window.append(loss.item())
            if step % 25 == 0:
                log(log_path, {"phase": f"student {name}", "step": step, "loss": round(float(np.mean(window)), 5),
                               "seconds": round(time.time() - phase_start, 1)})
                window = []
        student.eval()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    pipe.save_pretrained(args.out / "pipeline")
    log(log_path, {"phase": "done", "seconds": round(time.time() - started, 1)})


if __name__ == "__main__":
    main()
