"""Train the embedded 'tiny-trained' model: a small two-expert Wan2.2 on the procedural world.

Recipe (shared/notes/tiny-training.md, measured on this 2-core CPU; objects enlarged to radius 0.25 to
help the VAE): a frozen random UMT5 text encoder; an AutoencoderKLWan trained with a deterministic
latent, tiny KL and a foreground-weighted MSE; a base WanTransformer3DModel trained by rectified flow
on the normalized latents (10% empty prompts for CFG); then two copies specialized on the high-noise
(t >= 875) and low-noise (t < 875) ranges, as Wan2.2's experts are. Deterministic seeds; the loss
curves go to a JSON-lines log. CI never trains.

    python experiments/train_tiny/train.py --out /tmp/tiny-trained --vae-minutes 12 --dit-minutes 9 \
        --expert-minutes 3

A deeper transformer with A14B-like proportions (the entrance under 10% of each expert's parameters),
reusing tiny-trained's VAE, text encoder and latent statistics (no VAE training):

    python experiments/train_tiny/train.py --out /tmp/tiny-deep --reuse sensq/models/weights/tiny-trained \
        --layers 20 --heads 2 --ffn 256 --freq-dim 64 --dit-minutes 30 --expert-minutes 8
"""

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sensq.eval.procedural import BACKGROUNDS, all_scenes, render
from sensq.models.wan import build_tokenizer

FRAMES, SIZE = 9, 32


def build_components(seed: int = 0, layers: int = 4, heads: int = 4, ffn: int = 512, freq_dim: int = 256):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(seed + 2)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=freq_dim, ffn_dim=ffn, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return tokenizer, text_encoder, vae, transformer, scheduler


def dataset(rng: np.random.Generator, n: int):
    scenes = all_scenes()
    picks = rng.integers(0, len(scenes), n)
    clips, prompts, backgrounds = [], [], []
    for i in picks:
        scene = scenes[i]
        clips.append(render(scene, FRAMES, SIZE, jitter=tuple(rng.uniform(-0.05, 0.05, 2))))
        prompts.append(scene.prompt)
        backgrounds.append(BACKGROUNDS[scene.background])
    video = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3) * 2 - 1  # [B, 3, F, H, W] in [-1, 1]
    return video, prompts, torch.tensor(np.array(backgrounds), dtype=torch.float32) * 2 - 1


def log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train_vae(vae, minutes: float, log_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    vae.train()
    started, step = time.time(), 0
    while time.time() - started < minutes * 60:
        video, _, background = dataset(rng, 8)
        posterior = vae.encode(video).latent_dist
        recon = vae.decode(posterior.mode()).sample
        foreground = ((video - background[:, :, None, None, None]).abs().amax(1, keepdim=True) > 0.2).float()
        weight = 1 + 5 * foreground  # the object is a small share of the pixels: weight it up
        loss = (weight * (recon - video) ** 2).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % 20 == 0:
            psnr = 10 * torch.log10(4 / F.mse_loss(recon.clamp(-1, 1), video)).item()
            log(log_path, {"phase": "vae", "step": step, "seconds": round(time.time() - started, 1),
                           "loss": round(loss.item(), 5), "psnr": round(psnr, 2)})
    vae.eval()


@torch.no_grad()
def encode_pool(vae, text_encoder, tokenizer, n: int, seed: int):
    from diffusers import WanPipeline

    rng = np.random.default_rng(seed)
    latents, embeds = [], []
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=None, transformer=None,
                       transformer_2=None, boundary_ratio=0.875)
    for _ in range(n // 64):
        video, prompts, _ = dataset(rng, 64)
        latents.append(vae.encode(video).latent_dist.mode())
        embeds.append(pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512)[0])
    empty = pipe.encode_prompt([""], do_classifier_free_guidance=False, max_sequence_length=512)[0]
    return torch.cat(latents), torch.cat(embeds), empty


def train_flow(transformer, latents, embeds, empty, minutes: float, log_path: Path, seed: int, phase: str,
               t_range=(0.0, 1.0), lr: float = 1e-3, warmup: int = 200) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    transformer.train()
    started, step, window = time.time(), 0, []
    while time.time() - started < minutes * 60:
        index = torch.randint(0, len(latents), (64,), generator=generator)
        x0, text = latents[index], embeds[index].clone()
        drop = torch.rand(64, generator=generator) < 0.1
        text[drop] = empty
        # logit-normal t, restricted to this expert's range
        t = torch.sigmoid(torch.randn(64, generator=generator))
        t = t_range[0] + (t_range[1] - t_range[0]) * t
        noise = torch.randn(x0.shape, generator=generator)
        xt = (1 - t)[:, None, None, None, None] * x0 + t[:, None, None, None, None] * noise
        prediction = transformer(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=text,
                                 return_dict=False)[0]
        loss = F.mse_loss(prediction, noise - x0)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        step += 1
        window.append(loss.item())
        if step % 50 == 0:
            log(log_path, {"phase": phase, "step": step, "seconds": round(time.time() - started, 1),
                           "loss": round(float(np.mean(window)), 5)})
            window = []
    transformer.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vae-minutes", type=float, default=12)
    parser.add_argument("--dit-minutes", type=float, default=9)
    parser.add_argument("--expert-minutes", type=float, default=3)
    parser.add_argument("--pool", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=4, help="Transformer blocks per expert.")
    parser.add_argument("--heads", type=int, default=4, help="Attention heads (of 32 dims each).")
    parser.add_argument("--ffn", type=int, default=512, help="FFN width.")
    parser.add_argument("--freq-dim", type=int, default=256, help="Timestep sinusoid width.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="Take the tokenizer, text encoder, VAE (and its latent statistics) and scheduler from "
                             "this trained pipeline folder instead of training a VAE.")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "training_log.jsonl"
    log_path.unlink(missing_ok=True)
    started = time.time()
    tokenizer, text_encoder, vae, transformer, scheduler = build_components(args.seed, args.layers, args.heads,
                                                                            args.ffn, args.freq_dim)
    if args.reuse is not None:
        from diffusers import WanPipeline

        reused = WanPipeline.from_pretrained(str(args.reuse), torch_dtype=torch.float32)
        tokenizer, text_encoder, vae, scheduler = reused.tokenizer, reused.text_encoder, reused.vae, reused.scheduler
        latents, embeds, empty = encode_pool(vae, text_encoder, tokenizer, args.pool, args.seed + 1)
        mean = torch.tensor(vae.config.latents_mean)
        std = torch.tensor(vae.config.latents_std)
    else:
        train_vae(vae, args.vae_minutes, log_path, args.seed)
        latents, embeds, empty = encode_pool(vae, text_encoder, tokenizer, args.pool, args.seed + 1)
        mean = latents.mean(dim=(0, 2, 3, 4))
        std = latents.std(dim=(0, 2, 3, 4))
        vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    normalized = (latents - mean[None, :, None, None, None]) / std[None, :, None, None, None]
    train_flow(transformer, normalized, embeds, empty, args.dit_minutes, log_path, args.seed + 2, "base")
    high, low = copy.deepcopy(transformer), copy.deepcopy(transformer)
    train_flow(high, normalized, embeds, empty, args.expert_minutes, log_path, args.seed + 3, "high",
               t_range=(0.875, 1.0), lr=3e-4, warmup=20)
    train_flow(low, normalized, embeds, empty, args.expert_minutes, log_path, args.seed + 4, "low",
               t_range=(0.0, 0.875), lr=3e-4, warmup=20)
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=high, transformer_2=low, boundary_ratio=0.875)
    pipe.save_pretrained(args.out / "pipeline")
    log(log_path, {"phase": "done", "seconds": round(time.time() - started, 1)})


if __name__ == "__main__":
    main()
