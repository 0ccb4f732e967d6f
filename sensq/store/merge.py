"""Join probe files written by several ranks (disjoint prompt shards of one run) into one file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from sensq.errors import InputError
from sensq.store.probe_file import ProbeFile
from sensq.store.probe_writer import ProbeWriter, _create_allocated

_RUN_ATTRS = ("model_id", "model_fingerprint", "loras", "trajectory", "probe_config", "branches", "experts")


def merge_probe_files(parts: list[Path], out: Path) -> None:
    """Write ``out`` holding every prompt of ``parts`` in prompt-index order; atomically.

    Raises:
        InputError: a part is missing or incomplete, or the parts come from different runs.
    """
    files = [ProbeFile(p) for p in parts]  # each checked by open_h5
    try:
        first = files[0]
        for part in files:
            for key in _RUN_ATTRS:
                if part.file.attrs.get(key) != first.file.attrs.get(key):
                    raise InputError(f"{str(part.path)!r} differs from {str(first.path)!r} in {key}: not one run")
            if not part.done.all():
                missing = part.prompt_index[~part.done].tolist()
                raise InputError(f"{str(part.path)!r} has incomplete prompts {missing}; resume that rank first")
        owners = [(int(index), k, slot) for k, part in enumerate(files) for slot, index in enumerate(part.prompt_index)]
        owners.sort()
        if len({index for index, _, _ in owners}) != len(owners):
            raise InputError("the parts share prompt indices: they are not disjoint shards")
        tmp = ProbeWriter.tmp_path(out)
        tmp.unlink(missing_ok=True)
        with h5py.File(tmp, "w") as merged:
            for key, value in first.file.attrs.items():
                merged.attrs[key] = value
            merged.attrs["shard"] = json.dumps([0, 1])
            merged.attrs["merged_from"] = json.dumps([str(p.name) for p in parts])
            for name in ("text", "negative", "index", "seed"):
                values = [files[k].file[f"prompts/{name}"][slot] for _, k, slot in owners]
                dtype = first.file[f"prompts/{name}"].dtype
                merged.create_dataset(f"prompts/{name}", data=np.array(values, dtype=dtype), dtype=dtype)
            done = _create_allocated(merged.require_group("prompts"), "done", (len(owners),), np.bool_)
            done[...] = True
            first.file.copy("trajectory", merged)
            for expert in first.experts:
                source = first.file[f"experts/{expert}"]
                group = merged.create_group(f"experts/{expert}")
                for key, value in source.attrs.items():
                    group.attrs[key] = value
                group.create_dataset("steps", data=source["steps"][...])
                _merge_tree(files, owners, f"experts/{expert}", group)
        os.replace(tmp, out)
    finally:
        for part in files:
            part.close()


def _merge_tree(files, owners, path: str, target: h5py.Group) -> None:
    source = files[0].file[path]
    for key, value in source.attrs.items():
        target.attrs[key] = value
    for name, item in source.items():
        if name == "steps" and path.count("/") == 1:
            continue
        if isinstance(item, h5py.Group):
            _merge_tree(files, owners, f"{path}/{name}", target.require_group(name))
        elif path.endswith("layer_table"):
            target.create_dataset(name, data=item[...], dtype=item.dtype)
        else:
            dataset = _create_allocated(target, name, (len(owners),) + item.shape[1:], item.dtype)
            for row, (_, k, slot) in enumerate(owners):
                dataset[row] = files[k].file[f"{path}/{name}"][slot]
