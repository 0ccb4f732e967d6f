"""Load anything sensq runs on: an embedded model, a diffusers folder, a cached Hub id, or a quantized
sensq checkpoint (``sensq apply-plan --out``), through one function."""

from __future__ import annotations

import torch

from sensq.models import LoadedModel, load_source_model
from sensq.quant.checkpoint import is_checkpoint, load_quantized


def load_model(model: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load ``model``: a sensq checkpoint folder (its deployed 4-bit layers, :func:`load_quantized`; fp32 keeps
    the checkpoint's own dtype), else an embedded name, a local diffusers folder or a cached Hub id
    (:func:`sensq.models.load_source_model`).

    Raises:
        InputError: unknown name, folder without a pipeline, Hub id not cached, a pipeline of no registered
            family, a damaged checkpoint.
    """
    if is_checkpoint(model):
        return load_quantized(model, device, None if dtype == torch.float32 else dtype)
    return load_source_model(model, device, dtype)
