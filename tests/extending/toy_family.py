"""A model family in one module: a WanPipeline subclass with one expert whose entrance is the patch embedding
alone (the real worked example, LTX-Video, is sensq/models/ltx.py)."""

import dataclasses

import torch
from diffusers import WanPipeline

from sensq.models import EMBEDDED, LoadedModel, model_fingerprint
from sensq.models.family import register_family, unregister_family
from sensq.models.wan import WAN_SINGLE


class ToyWanPipeline(WanPipeline):
    pass


TOY = dataclasses.replace(WAN_SINGLE, name="toy-wan", description="toy: one-expert Wan, entrance = patch embedding",
                          pipeline_class="ToyWanPipeline", entrance=(r"patch_embedding",))


def load() -> LoadedModel:
    """The embedded one-expert tiny Wan as a ToyWanPipeline (what loading a saved toy pipeline would give)."""
    tiny = EMBEDDED["tiny-wan21"]
    pipe = tiny.build()
    pipe.__class__ = ToyWanPipeline
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe, TOY, "toy-wan", model_fingerprint(pipe, TOY), tiny.resolution, torch.device("cpu"),
                       torch.float32)


def register() -> None:
    register_family(TOY)


def unregister() -> None:
    unregister_family(TOY.name)


register()
