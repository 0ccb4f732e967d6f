"""An export target in one module: every layer as sensq deployed it, dequantized to BF16, one safetensors file per
expert (for a runtime without quantized kernels)."""

import os

import torch
from safetensors.torch import save_file

from sensq.export import Layer, Target, Written, register_target
from sensq.export.target import nmse, unregister_target
from sensq.store.files import temporary_sibling


def layer(layer: Layer) -> Written:
    weight = layer.weight.to(torch.bfloat16)
    return Written({f"{layer.wan}.weight": weight.reshape(layer.shape).contiguous()}, "bf16", False,
                   nmse(weight.float(), layer.weight.float()), "dequantized to BF16")


def write(path, tensors: dict, family: str) -> None:
    tmp = temporary_sibling(path, ".tmp")
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(tmp), metadata={"family": family})
    os.replace(tmp, path)


def register() -> None:
    register_target(Target("toy-bf16", ".safetensors", "every layer dequantized to BF16", layer, write))


def unregister() -> None:
    unregister_target("toy-bf16")


register()
