"""Wan in diffusers: the two-expert Wan2.2-T2V-A14B family, the single-expert Wan family (Wan2.1-T2V),
the embedded tiny pipelines, and the real models' inventories.

Both families are :class:`WanFamily`: routing by the pipeline's ``boundary_ratio`` and the resolution
check (rotary positions, a lower bound on the peak memory) are Wan's own; everything else is the
generic :class:`sensq.models.family.ModelFamily`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from sensq.errors import InputError
from sensq.models.family import BlockArgument, ModelFamily, TinyModel, register_family

EXPERTS = ("high", "low")
"""Wan2.2's expert names, used in plan rules, probe files and rankings: ``high`` runs t >= boundary."""

A14B_TRANSFORMER_CONFIG = {
    "patch_size": [1, 2, 2], "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
    "added_kv_proj_dim": None, "rope_max_seq_len": 1024, "pos_embed_seq_len": None,
}
"""`Wan-AI/Wan2.2-T2V-A14B-Diffusers` transformer/config.json (identical for both experts)."""

WAN21_14B_TRANSFORMER_CONFIG = {**A14B_TRANSFORMER_CONFIG}
"""`Wan-AI/Wan2.1-T2V-14B-Diffusers` transformer/config.json: the same architecture as one A14B expert."""

_WAN_BLOCK_ARGUMENTS = (
    BlockArgument("hidden_states", ("hidden_states",), model_dtype=True),
    BlockArgument("encoder_hidden_states", ("encoder_hidden_states",), model_dtype=True),
    BlockArgument("temb", ("temb",)),
    BlockArgument("rotary_emb", ("rotary_cos", "rotary_sin")),
)


@dataclass(frozen=True)
class WanFamily(ModelFamily):
    """A ``WanPipeline`` family: routing by ``boundary_ratio``, Wan's resolution check."""

    def expert_label(self, expert: str) -> str:
        return f"{expert}-noise expert" if len(self.expert_attrs) > 1 else super().expert_label(expert)

    def boundary_timestep(self, pipe) -> float | None:
        if len(self.expert_attrs) < 2:
            return None
        ratio = pipe.config.get("boundary_ratio") if hasattr(pipe.config, "get") else pipe.config.boundary_ratio
        if ratio is None:
            return None
        return ratio * pipe.scheduler.config.num_train_timesteps

    def route(self, pipe, timestep: float) -> str:
        """The first expert (``high``) when t >= boundary_ratio * num_train_timesteps, else the second."""
        boundary = self.boundary_timestep(pipe)
        names = self.experts(pipe)
        return names[0] if boundary is None or timestep >= boundary else names[1]

    def call_kwargs(self, pipe, trajectory) -> dict:
        if self.boundary_timestep(pipe) is None:
            return {}
        return {"guidance_scale_2": trajectory.guidance_2 if trajectory.guidance_2 is not None else trajectory.guidance}

    def fixed_recipe(self, n_blocks: int) -> tuple[str, str] | None:
        """ModelOpt's Wan recipe (its diffusers example): the embedders, proj_out, the first and last three blocks."""
        edge = sorted({0, 1, 2, n_blocks - 3, n_blocks - 2, n_blocks - 1} & set(range(n_blocks)))
        return ("ModelOpt Wan recipe",
                r"(patch_embedding|condition_embedder\..*|proj_out|blocks\.(" + "|".join(map(str, edge)) + r")\..*)")

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
        super().check_resolution(pipe, height, width, frames, dtype, device)
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


_WAN_COMMON = {
    "pipeline_class": "WanPipeline", "transformer_class": "WanTransformer3DModel", "blocks": "blocks",
    "block_arguments": _WAN_BLOCK_ARGUMENTS,
    "entrance": (r"patch_embedding", r"condition_embedder\..*", r"blocks\.0\..*"), "exit": (r"proj_out",),
}

WAN22_A14B = register_family(WanFamily(
    name="wan2.2-t2v-a14b", description="Wan2.2-T2V-A14B: WanPipeline with two experts, transformer and transformer_2",
    expert_attrs={"high": "transformer", "low": "transformer_2"}, real_model_id="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    real_config=A14B_TRANSFORMER_CONFIG, **_WAN_COMMON))

WAN_SINGLE = register_family(WanFamily(
    name="wan-t2v", description="Wan2.1-T2V style: WanPipeline with one transformer (no transformer_2)",
    expert_attrs={"main": "transformer"}, real_model_id="Wan-AI/Wan2.1-T2V-14B-Diffusers",
    real_config=WAN21_14B_TRANSFORMER_CONFIG, **_WAN_COMMON))


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


def a14b_expert_on_meta() -> torch.nn.Module:
    """One A14B expert with the real config on the meta device (no memory, no weights)."""
    return WAN22_A14B.real_expert_on_meta()


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
    experts: int = 2


TINY_SPECS = {
    "tiny": TinySpec(heads=2, head_dim=16, ffn=64, layers=2, text_dim=32),
    # real head_dim (RoPE split 44/42/42), the real 2.7x FFN ratio and the real 4096-wide text input
    "tiny-realshape": TinySpec(heads=2, head_dim=128, ffn=704, layers=2, text_dim=4096, text_layers=1,
                               text_heads=2, text_d_kv=32, text_ff=64),
    # more blocks and A14B-like proportions (entrance ~1/4 of the parameters) for ablations on a CPU
    "small": TinySpec(heads=4, head_dim=64, ffn=1024, layers=6, text_dim=32),
    # the single-expert Wan family (Wan2.1-T2V style: no transformer_2, no boundary)
    "tiny-wan21": TinySpec(heads=2, head_dim=16, ffn=64, layers=2, text_dim=32, experts=1),
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
    """A ``WanPipeline`` with random weights (seeds fixed): two experts and boundary_ratio 0.875, or for a
    one-expert spec a Wan2.1-style pipeline (no ``transformer_2``, no boundary).

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
        transformer=_tiny_transformer(spec, seed=1),
        transformer_2=_tiny_transformer(spec, seed=2) if spec.experts == 2 else None,
        boundary_ratio=0.875 if spec.experts == 2 else None,
    )


TINY_MODELS = {name: TinyModel(functools.partial(build_tiny_pipeline, name), spec.resolution)
               for name, spec in TINY_SPECS.items()}
"""The embedded Wan pipelines (both families)."""
