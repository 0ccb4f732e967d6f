"""Wan2.2 (two experts) in diffusers: the adapter, the embedded tiny pipelines, and A14B's inventory.

The adapter is small metadata: which pipeline attributes are the experts, how steps are routed,
which layers are the entrance and the exit. Everything else is plain diffusers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

EXPERTS = ("high", "low")
"""Expert names used everywhere in sensq: plan rules, probe files, rankings."""

A14B_TRANSFORMER_CONFIG = {
    "patch_size": [1, 2, 2], "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
    "added_kv_proj_dim": None, "rope_max_seq_len": 1024, "pos_embed_seq_len": None,
}
"""`Wan-AI/Wan2.2-T2V-A14B-Diffusers` transformer/config.json (identical for both experts)."""


@dataclass(frozen=True)
class WanAdapter:
    """What sensq needs to know about a Wan2.2 pipeline.

    Attributes:
        expert_attrs: pipeline attribute per expert name (``high`` runs t >= boundary).
        entrance: regexes (on layer names inside an expert) of the entrance layers the method protects.
        exit: regexes of the exit layers.
        default_resolution: (height, width, frames) used when the user does not pass any.
    """

    expert_attrs: dict[str, str] = field(default_factory=lambda: {"high": "transformer", "low": "transformer_2"})
    entrance: tuple[str, ...] = (r"patch_embedding", r"condition_embedder\..*", r"blocks\.0\..*")
    exit: tuple[str, ...] = (r"proj_out",)
    default_resolution: tuple[int, int, int] = (480, 832, 81)
    first_block: str = "blocks.0"

    def expert_module(self, pipe, expert: str) -> torch.nn.Module:
        module = getattr(pipe, self.expert_attrs[expert], None)
        if module is None:
            raise ValueError(f"this pipeline has no {self.expert_attrs[expert]!r} ({expert}-noise expert)")
        return module

    def experts(self, pipe) -> list[str]:
        """Expert names present in ``pipe`` (Wan2.1-style pipelines have only ``high``)."""
        return [name for name, attr in self.expert_attrs.items() if getattr(pipe, attr, None) is not None]

    def boundary_timestep(self, pipe) -> float | None:
        ratio = pipe.config.get("boundary_ratio") if hasattr(pipe.config, "get") else pipe.config.boundary_ratio
        if ratio is None:
            return None
        return ratio * pipe.scheduler.config.num_train_timesteps

    def route(self, pipe, timestep: float) -> str:
        """The expert that runs ``timestep``: ``high`` when t >= boundary_ratio * num_train_timesteps."""
        boundary = self.boundary_timestep(pipe)
        return "high" if boundary is None or timestep >= boundary else "low"

    def check_resolution(self, pipe, height: int, width: int, frames: int, dtype: torch.dtype,
                         device: torch.device) -> int:
        """Refuse, before allocating anything, a resolution the model cannot run or this machine cannot hold.

        The estimate is a lower bound on the peak: the transformer's widest activation (tokens x
        (ffn_dim + 8 dim)) plus the VAE decoder's full-resolution feature maps (frames x H x W x base_dim)
        and the decoded frames. Returns the estimate in bytes.

        Raises:
            InputError: more latent positions than the rotary embedding covers, or an estimate above the
                memory available on ``device``.
        """
        from sensq.errors import InputError

        expert = self.expert_module(pipe, self.experts(pipe)[0])
        config = expert.config
        p_t, p_h, p_w = config.patch_size
        scale_s = getattr(pipe, "vae_scale_factor_spatial", 8)
        scale_t = getattr(pipe, "vae_scale_factor_temporal", 4)
        grid = ((frames - 1) // scale_t + 1) // p_t, height // scale_s // p_h, width // scale_s // p_w
        limit = config.rope_max_seq_len
        if max(grid) > limit:
            raise InputError(f"{height}x{width}x{frames} needs {max(grid)} positions along one axis; this model's "
                             "rotary "
                             f"embedding covers {limit}: use a smaller --height/--width/--frames")
        tokens = grid[0] * grid[1] * grid[2]
        element = torch.finfo(dtype).bits // 8
        dim = config.num_attention_heads * config.attention_head_dim
        vae = getattr(pipe, "vae", None)
        base_dim = vae.config.get("base_dim", 96) if vae is not None else 96
        needed = tokens * (config.ffn_dim + 8 * dim) * element + frames * height * width * (base_dim + 12) * 4
        available = _available_memory(device)
        if available is not None and needed > available:
            raise InputError(f"{height}x{width}x{frames} needs at least {needed / 1e9:.1f} GB on {device} and "
                             f"{available / 1e9:.1f} GB are available: use fewer --frames or a smaller "
                             "--height/--width")
        return needed

    def is_entrance(self, layer: str) -> bool:
        return any(re.fullmatch(pattern, layer) for pattern in self.entrance)

    def is_exit(self, layer: str) -> bool:
        return any(re.fullmatch(pattern, layer) for pattern in self.exit)


def _available_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (MemAvailable on a CPU, cudaMemGetInfo on a GPU); None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def quantizable_layers(expert: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every ``nn.Linear`` and the patch-embedding ``Conv3d`` of an expert, in registration order, and
    their deployed forms (:mod:`sensq.quant.deployed`) in a loaded checkpoint: probing a deployed model
    sees the same layers as probing its source.

    Raises:
        ValueError: the expert still holds unfused LoRA layers (fuse and unload them first).
    """
    from sensq.quant.deployed import is_deployed

    layers = []
    for name, module in expert.named_modules():
        if ".lora_A" in name or ".lora_B" in name or name.endswith(".base_layer"):
            raise ValueError(f"layer {name!r} is part of an unfused LoRA: fuse_lora() and unload_lora_weights() first")
        if (isinstance(module, torch.nn.Linear) or is_deployed(module)
                or (isinstance(module, torch.nn.Conv3d) and name == "patch_embedding")):
            layers.append((name, module))
    return layers


def linear_count_and_params(expert: torch.nn.Module) -> tuple[int, int]:
    """(number of ``nn.Linear`` layers, total parameters of the expert). Works on the meta device."""
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in expert.modules())
    return n_linear, sum(p.numel() for p in expert.parameters())


def a14b_expert_on_meta() -> torch.nn.Module:
    """One A14B expert with the real config on the meta device (no memory, no weights)."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        return WanTransformer3DModel(**A14B_TRANSFORMER_CONFIG)


# ---------------------------------------------------------------------------------------------
# Embedded tiny pipelines (real classes, built in-process, nothing downloaded)
# ---------------------------------------------------------------------------------------------

_TINY_WORDS = (
    "a an the of in on at with and to from by over under near left right up down moving slowly quickly "
    "red green blue yellow white black orange purple pink gray dark light bright background circle square "
    "triangle ball box cat dog bird fish car person man woman child tree flower house sky sea water city "
    "street forest mountain river beach snow rain sun moon night day video camera shot close view walking "
    "running flying swimming playing sitting standing small large big tiny two three blurry low quality"
).split()


def build_tokenizer():
    """A T5 (Unigram) tokenizer from an in-code vocabulary: whole words plus single characters, so
    any text tokenizes (unknown words fall back to letters). Layout as T5: pad 0, eos 1, unk 2."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -3.0 - 1e-3 * i) for i, word in enumerate(sorted(set(_TINY_WORDS)))]
    vocab += [(char, -10.0) for char in "abcdefghijklmnopqrstuvwxyz0123456789,.'-"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of an embedded tiny Wan2.2 pipeline."""

    heads: int
    head_dim: int
    ffn: int
    layers: int
    text_dim: int
    text_layers: int = 2
    text_heads: int = 4
    text_d_kv: int = 8
    text_ff: int = 64
    resolution: tuple[int, int, int] = (32, 32, 9)


TINY_SPECS = {
    "tiny": TinySpec(heads=2, head_dim=16, ffn=64, layers=2, text_dim=32),
    # real head_dim (RoPE split 44/42/42), the real 2.7x FFN ratio and the real 4096-wide text input
    "tiny-realshape": TinySpec(heads=2, head_dim=128, ffn=704, layers=2, text_dim=4096, text_layers=1,
                               text_heads=2, text_d_kv=32, text_ff=64),
    # more blocks and A14B-like proportions (entrance ~1/4 of the parameters) for ablations on a CPU
    "small": TinySpec(heads=4, head_dim=64, ffn=1024, layers=6, text_dim=32),
}


def _tiny_transformer(spec: TinySpec, seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)  # a distinct seed per expert: the two experts must differ
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=spec.heads, attention_head_dim=spec.head_dim,
        in_channels=16, out_channels=16, text_dim=spec.text_dim, freq_dim=256, ffn_dim=spec.ffn,
        num_layers=spec.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        rope_max_seq_len=1024,
    ).eval()


def build_tiny_pipeline(name: str = "tiny"):
    """A two-expert ``WanPipeline`` with random weights (seeds fixed), boundary_ratio 0.875.

    Raises:
        KeyError: unknown tiny preset.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    spec = TINY_SPECS[name]
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=spec.text_dim, d_kv=spec.text_d_kv, d_ff=spec.text_ff,
        num_layers=spec.text_layers, num_heads=spec.text_heads, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
        transformer=_tiny_transformer(spec, seed=1), transformer_2=_tiny_transformer(spec, seed=2),
        boundary_ratio=0.875,
    )
