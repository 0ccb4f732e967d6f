"""Quantized checkpoints (``sensq.checkpoint/1``): packed weights in each format's bit layout.

Layout of a checkpoint folder::

    manifest.json                 schema, sensq version, source model, plan, per-layer formats and
                                  calibration factors, file hashes, sizes
    pipeline/                     the rest of the pipeline (text encoder, VAE, tokenizer, scheduler),
                                  saved by diffusers with the two experts left out
    transformer/config.json       the high-noise expert's config
    transformer/weights.safetensors
    transformer_2/...             the same for the low-noise expert

In ``weights.safetensors`` every tensor of the expert's state dict is stored as it is, except the
weights of quantized layers: those are stored packed (HiF4: ``<layer>.weight.blocks``, 36 bytes per
64 values, spec §6; other formats: ``.codes`` and ``.scale``), with the packing headers in the file's
metadata. With ``fake=True`` the quantized weights are stored dequantized instead (a quick
experiment format; same outputs).
"""

from sensq.quant.checkpoint.load import load_quantized
from sensq.quant.checkpoint.manifest import (
    CHECKPOINT_SCHEMA,
    CHECKPOINT_VERSION,
    PICKLE_SUFFIXES,
    WEIGHTS_FILE,
    CheckpointSizes,
    ManifestLayer,
    is_checkpoint,
    read_manifest,
)
from sensq.quant.checkpoint.write import save_quantized

__all__ = ["CHECKPOINT_SCHEMA", "CHECKPOINT_VERSION", "PICKLE_SUFFIXES", "WEIGHTS_FILE", "CheckpointSizes",
           "ManifestLayer", "is_checkpoint", "load_quantized", "read_manifest", "save_quantized"]
