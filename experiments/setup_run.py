"""What the measuring drivers share: the embedded model, its trajectory and prompts, a probe and an mse ranking
(resumed when the output folder already holds them)."""

from dataclasses import dataclass
from pathlib import Path

import torch

from sensq.loading import load_model
from sensq.probes.recorder import ProbeRequest, run_probe
from sensq.prompts import load_prompts
from sensq.sensitivity import RankRequest, rank_layers
from sensq.trajectory import Trajectory, get_preset


@dataclass
class Run:
    model: object
    trajectory: Trajectory
    prompts: list
    probe: Path
    ranking: object


def add_arguments(parser, out: str) -> None:
    parser.add_argument("--model", default="tiny-trained-4step")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="UniPC steps with CFG (without --preset)")
    parser.add_argument("--preset", default=None, help="a trajectory preset instead (e.g. lightning-4step)")
    parser.add_argument("--out", type=Path, default=Path(out))


def trajectory_flags(args) -> str:
    return f"--steps {args.steps}" + (f" --preset {args.preset}" if args.preset else "")


def probe_and_rank(args, formats=("hif4",)) -> Run:
    """Load ``args.model``, probe every expert along the trajectory, rank by mse in ``formats``."""
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model, torch.device("cpu"), torch.float32)
    trajectory = (get_preset(args.preset) if args.preset else Trajectory(steps=args.steps)).with_resolution(
        model.default_resolution)
    prompts = load_prompts(None, args.prompts, procedural=model.procedural)
    probe = args.out / "probe.h5"
    run_probe(ProbeRequest(model, trajectory, prompts, model.family.experts(model.pipe), probe,
                           resume=probe.exists()))
    ranking = rank_layers(RankRequest(probe, model, list(formats), metric="mse"))
    ranking.save(args.out / "ranking.json")
    return Run(model, trajectory, prompts, probe, ranking)
