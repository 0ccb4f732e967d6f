"""LTX-Video in diffusers (``LTXPipeline``, ``LTXVideoTransformer3DModel``): the third family, not Wan.

What differs from Wan, and is declared here rather than handled anywhere else:

* one expert (``transformer``), so routing is trivial;
* classifier-free guidance runs both branches in one batched forward (``cache_context("cond_uncond")``,
  batch ``[uncond, cond]``), where Wan runs one forward per branch;
* the blocks are ``transformer_blocks``, called with ``image_rotary_emb`` and ``encoder_attention_mask``;
* the pipeline passes its own sigmas (``linspace(1, 1/N, N)``) and a resolution-dependent shift ``mu`` to
  a flow-matching Euler scheduler (UniPC is not accepted), height and width are multiples of 32, frames
  ``8k+1``; its ``latent`` output is packed ``[B, tokens, C]`` and is unpacked to ``[B, C, F, H, W]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from sensq.models.family import BlockArgument, ModelFamily, TinyModel, register_family

LTX_TRANSFORMER_CONFIG = {
    "in_channels": 128, "out_channels": 128, "patch_size": 1, "patch_size_t": 1, "num_attention_heads": 32,
    "attention_head_dim": 64, "cross_attention_dim": 2048, "num_layers": 28, "activation_fn": "gelu-approximate",
    "qk_norm": "rms_norm_across_heads", "norm_elementwise_affine": False, "norm_eps": 1e-6,
    "caption_channels": 4096, "attention_bias": True, "attention_out_bias": True,
}
"""`Lightricks/LTX-Video` (0.9.x, 2B) transformer/config.json."""


@dataclass(frozen=True)
class LTXFamily(ModelFamily):
    """``LTXPipeline``: the pipeline's own sigma schedule and packed latents."""

    def schedule(self, pipe, trajectory) -> dict:
        """The ``set_timesteps`` arguments the pipeline itself uses for ``trajectory``."""
        from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

        steps = trajectory.steps
        sigmas = list(trajectory.sigmas) if trajectory.sigmas is not None else \
            np.linspace(1.0, 1 / steps, steps).tolist()
        config = pipe.scheduler.config
        tokens = (((trajectory.frames - 1) // pipe.vae_temporal_compression_ratio + 1)
                  * (trajectory.height // pipe.vae_spatial_compression_ratio)
                  * (trajectory.width // pipe.vae_spatial_compression_ratio))
        mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        return {"sigmas": sigmas, "mu": mu}

    def call_kwargs(self, pipe, trajectory) -> dict:
        return {"sigmas": list(trajectory.sigmas)} if trajectory.sigmas is not None else {}

    def check_resolution(self, pipe, height: int, width: int, frames: int, dtype: torch.dtype,
                         device: torch.device) -> None:
        """Height and width multiples of 32 (the pipeline's own check); frames ``r k + 1`` with ``r`` the VAE's
        temporal compression (8 for LTX-Video), so that no frame is silently dropped."""
        from sensq.errors import InputError

        super().check_resolution(pipe, height, width, frames, dtype, device)
        ratio = pipe.vae_temporal_compression_ratio
        if (frames - 1) % ratio:
            raise InputError(f"--frames must be {ratio}k+1 for this {self.name} model, got {frames}")

    def video_latents(self, pipe, latents: torch.Tensor, trajectory) -> torch.Tensor:
        """``[B, tokens, C]`` -> ``[B, C, F, H, W]`` (the pipeline's own unpacking, before denormalizing)."""
        frames = (trajectory.frames - 1) // pipe.vae_temporal_compression_ratio + 1
        return pipe._unpack_latents(latents, frames, trajectory.height // pipe.vae_spatial_compression_ratio,
                                    trajectory.width // pipe.vae_spatial_compression_ratio,
                                    pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size)


LTX_VIDEO = register_family(LTXFamily(
    name="ltx-video", description="LTX-Video: LTXPipeline with one transformer, batched CFG",
    pipeline_class="LTXPipeline", transformer_class="LTXVideoTransformer3DModel",
    expert_attrs={"main": "transformer"}, blocks="transformer_blocks",
    block_arguments=(
        BlockArgument("hidden_states", ("hidden_states",), model_dtype=True),
        BlockArgument("encoder_hidden_states", ("encoder_hidden_states",), model_dtype=True),
        BlockArgument("temb", ("temb",), model_dtype=True),
        BlockArgument("image_rotary_emb", ("rotary_cos", "rotary_sin")),
        BlockArgument("encoder_attention_mask", ("encoder_attention_mask",), model_dtype=True),
    ),
    entrance=(r"proj_in", r"time_embed\..*", r"caption_projection\..*", r"transformer_blocks\.0\..*"),
    exit=(r"proj_out",),
    guidance="batched", batched_order=("uncond", "cond"),
    default_resolution=(480, 704, 161), tiny_resolution=(32, 32, 9),
    real_model_id="Lightricks/LTX-Video", real_config=LTX_TRANSFORMER_CONFIG,
    schedulers=("euler",), frame_multiple=1, size_multiple=32,
))


def build_tiny_ltx_pipeline():
    """An ``LTXPipeline`` with random weights (seeds fixed): 2 blocks of width 32, an 8-channel VAE with
    8x spatial and 8x temporal compression, a 2-layer T5 text encoder, Euler flow matching."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    from sensq.models.wan import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=2,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ).eval()
    torch.manual_seed(1)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=2, caption_channels=32,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return LTXPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                       transformer=transformer)


TINY_MODELS = {"tiny-ltx": TinyModel(functools.partial(build_tiny_ltx_pipeline), (32, 32, 9))}
"""The embedded LTX-Video pipeline."""
