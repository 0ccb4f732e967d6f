"""Bytes a probe file holds per prompt for Wan2.2-T2V-A14B, computed from the schema.

Runs one A14B expert on the meta device (no memory, no weights) with shape-recording hooks to get
every layer's input rows at the chosen resolution, then applies the sensq.probe/1 layout.

    python experiments/probe_volume.py --height 480 --width 832 --frames 81 --tokens 32
"""

import argparse

import torch

from sensq.models.layers import quantizable_layers
from sensq.models.wan import a14b_expert_on_meta
from sensq.probes.capture import _as_rows


def layer_rows(height: int, width: int, frames: int, text_tokens: int = 512):
    expert = a14b_expert_on_meta()
    shapes = {}
    handles = []
    for name, module in quantizable_layers(expert):
        def hook(mod, args, name=name):
            rows = _as_rows(mod, args[0])
            shapes[name] = (rows.shape[0], rows.shape[1])
        handles.append(module.register_forward_pre_hook(hook))
    first_block = {}

    def block_hook(mod, args):
        hidden, text, temb, (cos, sin) = args
        first_block.update(hidden_states=hidden.shape[1:], encoder_hidden_states=text.shape[1:],
                           temb=temb.shape[1:], rotary_cos=cos.shape[1:], rotary_sin=sin.shape[1:])
    handles.append(expert.blocks[0].register_forward_pre_hook(block_hook))
    latent = torch.empty(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, device="meta")
    with torch.no_grad():
        expert(hidden_states=latent, timestep=torch.empty(1, device="meta"),
               encoder_hidden_states=torch.empty(1, text_tokens, 4096, device="meta"))
    for handle in handles:
        handle.remove()
    return shapes, first_block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    shapes, first_block = layer_rows(args.height, args.width, args.frames)
    channel = sum(c for _, c in shapes.values())
    token = sum(t for t, _ in shapes.values())
    samples = sum(min(args.tokens, t) * c for t, c in shapes.values())
    first = sum(torch.Size(s).numel() for s in first_block.values())
    per_forward = {"channel_absmax": 4 * channel, "token_absmax": 4 * token, "samples": 4 * samples,
                   "first_block": 4 * first}
    total = sum(per_forward.values())
    video_tokens = max(t for t, _ in shapes.values())
    print(f"A14B expert at {args.height}x{args.width}x{args.frames}: {len(shapes)} layers, "
          f"{video_tokens} video tokens, --tokens {args.tokens}")
    for key, value in per_forward.items():
        print(f"  {key:15s} {value / 1e6:10.1f} MB per forward (one step, one branch)")
    print(f"  {'total':15s} {total / 1e6:10.1f} MB per forward; without first-block inputs "
          f"{(total - per_forward['first_block']) / 1e6:.1f} MB")
    for label, forwards in (("lightning-4step (4 steps, no CFG, both experts)", 4),
                            ("wan22-40step (40 steps x 2 CFG branches, both experts)", 80)):
        print(f"  per prompt, {label}: {forwards * total / 1e9:.2f} GB "
              f"({forwards * (total - per_forward['first_block']) / 1e9:.2f} GB with --no-first-block)")


if __name__ == "__main__":
    main()
