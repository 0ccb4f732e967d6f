"""Diffusers' Wan transformer keys -> the original Wan keys that ComfyUI, ComfyUI-GGUF and the Wan repo use.

The inverse of diffusers' own ``convert_wan_transformer_to_diffusers`` (``TRANSFORMER_KEYS_RENAME_DICT`` in
``diffusers/loaders/single_file_utils.py``); tests/export checks that diffusers' converter maps every key this
gives back to the model's own. Matching is by whole dotted components, so ``blocks.1.`` never matches
``blocks.10.`` (a substring rule that did is one of the failures peer converters had).
"""

from __future__ import annotations

import re

_TOP = {  # whole leading components
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
_IN_BLOCK = {  # whole components after blocks.N.
    "attn1": "self_attn", "attn2": "cross_attn", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2", "norm2": "norm3", "norm3": "norm2",
    "scale_shift_table": "modulation",
}
_BLOCK = re.compile(r"^(blocks\.\d+)\.(.*)$")


def _replace_components(rest: str, table: dict[str, str]) -> str:
    """Replace the longest table entries that are whole runs of dotted components, left to right."""
    parts, out, i = rest.split("."), [], 0
    keys = sorted(table, key=lambda k: -k.count("."))
    while i < len(parts):
        for key in keys:
            n = key.count(".") + 1
            if ".".join(parts[i:i + n]) == key:
                out.append(table[key])
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def wan_name(key: str) -> str:
    """``blocks.3.attn1.to_q.weight`` -> ``blocks.3.self_attn.q.weight``; ``proj_out.bias`` -> ``head.head.bias``."""
    match = _BLOCK.match(key)
    if match:
        return f"{match.group(1)}.{_replace_components(match.group(2), _IN_BLOCK)}"
    for prefix, target in _TOP.items():
        if key == prefix or key.startswith(prefix + "."):
            return target + key[len(prefix):]
    return key
