"""The quantizable layers of an expert, as every part of sensq sees them: probe, rank, plan, quantize.

A layer is quantizable when it is a GEMM: an ``nn.Linear``, or a ``Conv3d`` whose stride equals its
kernel and that has no padding (a patch embedding, one GEMM over flattened patches, see
:func:`patches_to_rows`). A layer class outside ``torch.nn`` (sensq's deployed layers) says which of
the two it stands for with an attribute ``sensq_layer_kind`` (``"linear"`` or ``"conv3d"``): a
loaded checkpoint then shows the same layers as its source. Modules inside such a layer are not layers.
Nothing here knows a model family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("linear", "conv3d")


@dataclass(frozen=True)
class LayerInfo:
    """What the plan needs to know about a layer: its expert, name, parameters and input width."""

    expert: str
    name: str
    params: int
    in_features: int
    kind: str = "linear"  # or "conv3d" (the patch embedding): exports need it


def is_patch_conv(module: torch.nn.Module) -> bool:
    """A ``Conv3d`` that is one GEMM over non-overlapping patches (stride = kernel, no padding, no groups)."""
    return (isinstance(module, torch.nn.Conv3d) and tuple(module.stride) == tuple(module.kernel_size)
            and all(p == 0 for p in module.padding) and module.groups == 1 and tuple(module.dilation) == (1, 1, 1))


def layer_kind(module: torch.nn.Module) -> str | None:
    """``"linear"``, ``"conv3d"`` (a patch embedding) or None (not quantizable)."""
    declared = getattr(type(module), "sensq_layer_kind", None) or getattr(module, "sensq_layer_kind", None)
    if declared is not None:
        return declared
    if isinstance(module, torch.nn.Linear):
        return "linear"
    return "conv3d" if is_patch_conv(module) else None


def quantizable_layers(expert: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every quantizable layer of an expert (see the module docstring), in registration order.

    Raises:
        ValueError: the expert still holds unfused LoRA layers (fuse and unload them first).
    """
    layers = []
    for name, module in expert.named_modules():
        if ".lora_A" in name or ".lora_B" in name or name.endswith(".base_layer"):
            raise ValueError(f"layer {name!r} is part of an unfused LoRA: fuse_lora() and unload_lora_weights() first")
        if layers and name.startswith(layers[-1][0] + "."):
            continue  # inside a layer (the variants of a layer whose precision follows the step)
        if name and layer_kind(module) is not None:
            layers.append((name, module))
    return layers


def layer_infos(experts: dict[str, torch.nn.Module]) -> list[LayerInfo]:
    """Every quantizable layer of the given expert modules (``{expert name: module}``; meta device is fine)."""
    infos = []
    for expert, module in experts.items():
        for name, layer in quantizable_layers(module):
            size, cols = layer_size(layer)
            infos.append(LayerInfo(expert, name, size, cols, layer_kind(layer)))
    return infos


def layer_size(layer: torch.nn.Module) -> tuple[int, int]:
    """(parameters, GEMM input width) of a quantizable layer, whatever holds its weight (a deployed or phased
    layer declares ``weight_shape``: its weight is packed or inside a variant)."""
    if hasattr(layer, "weight_shape"):
        rows, cols = layer.weight_shape
        return rows * cols + (0 if layer.bias is None else layer.bias.numel()), int(cols)
    return sum(p.numel() for p in layer.parameters(recurse=False)), int(layer.weight[0].numel())


def linear_count_and_params(expert: torch.nn.Module) -> tuple[int, int]:
    """(number of ``nn.Linear`` layers, total parameters of the expert). Works on the meta device."""
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in expert.modules())
    return n_linear, sum(p.numel() for p in expert.parameters())


def patches_to_rows(conv: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, C, F, H, W]`` -> ``[B*F'*H'*W', C*kt*kh*kw]`` (the patch vector in weight order)."""
    kt, kh, kw = conv.kernel_size
    b, c, f, h, w = x.shape
    patches = x.reshape(b, c, f // kt, kt, h // kh, kh, w // kw, kw)
    return patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(-1, c * kt * kh * kw)


def input_rows(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as the rows ``[tokens, in_features]`` its GEMM sees (a patch conv: its patches)."""
    return patches_to_rows(module, x) if layer_kind(module) == "conv3d" else x.reshape(-1, x.shape[-1])


def output_rows(x: torch.Tensor) -> torch.Tensor:
    """A layer's output as rows ``[tokens, out_features]``, in :func:`input_rows`' order (a patch conv's
    ``[B, C, F', H', W']`` becomes one row per patch)."""
    return x.permute(0, 2, 3, 4, 1).reshape(-1, x.shape[1]) if x.dim() == 5 else x.reshape(-1, x.shape[-1])
