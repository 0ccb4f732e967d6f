"""Writing the probe HDF5 file (``sensq.probe/1``); the reader is :class:`sensq.store.probe_file.ProbeFile`.

Crash safety: the file is built under ``<name>.tmp`` until the first prompt is complete (the only time its
structure changes), then renamed into place. Every dataset is allocated when it is created (HDF5 early
allocation, contiguous layout, no compression), so later writes change data only, never metadata; a prompt's
``done`` flag is set and flushed after all its data.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

import sensq
from sensq.store.probe_file import _STR, PROBE_SCHEMA, building_path, open_h5


def _create_allocated(group: h5py.Group, name: str, shape: tuple[int, ...], dtype) -> h5py.Dataset:
    """A contiguous dataset whose file space is allocated now (no fill: unwritten data is undefined)."""
    space = h5py.h5s.create_simple(tuple(shape))
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    type_id = h5py.h5t.py_create(np.dtype(dtype))
    return h5py.Dataset(h5py.h5d.create(group.id, name.encode(), type_id, space, dcpl=dcpl))


@dataclass(frozen=True)
class LayerShape:
    """What a layer's datasets need: its kind and sizes, and the token rows sampled from its input."""

    kind: str
    in_features: int
    out_features: int
    params: int
    tokens: int
    sample_rows: np.ndarray


class ProbeWriter:
    """Writes one probe file. Use :meth:`create` or :meth:`resume`, then :meth:`write_step` and
    :meth:`finish_prompt` per prompt; :meth:`close` at the end."""

    def __init__(self, path: Path, file: h5py.File, building: bool):
        self.path = path
        self.file = file
        self.building = building  # True while the file is still <name>.tmp (prompt 0 under way)
        self.planned_bytes: int | None = None  # the datasets' size, once allocated

    @staticmethod
    def tmp_path(path: Path) -> Path:
        return building_path(path)

    @classmethod
    def create(cls, path: Path, *, attrs: dict, prompts, seeds: list[int], steps, expert_steps: dict[str, list[int]],
               branches: tuple[str, ...]) -> ProbeWriter:
        """Start a new file under ``<path>.tmp`` with the prompt and trajectory tables."""
        tmp = cls.tmp_path(path)
        tmp.unlink(missing_ok=True)
        file = None
        try:
            file = h5py.File(tmp, "w")
            file.attrs["schema"] = PROBE_SCHEMA
            file.attrs["sensq_version"] = sensq.__version__
            for key, value in attrs.items():
                file.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
            file.attrs["branches"] = json.dumps(list(branches))
            file.attrs["experts"] = json.dumps(list(expert_steps))
            file.create_dataset("prompts/text", data=[p.text for p in prompts], dtype=_STR)
            file.create_dataset("prompts/negative", data=[p.negative for p in prompts], dtype=_STR)
            file.create_dataset("prompts/index", data=np.array([p.index for p in prompts], dtype=np.int64))
            file.create_dataset("prompts/seed", data=np.array(seeds, dtype=np.int64))
            done = _create_allocated(file.require_group("prompts"), "done", (len(prompts),), np.bool_)
            done[...] = False
            file.create_dataset("trajectory/step", data=np.array([s.index for s in steps], dtype=np.int32))
            file.create_dataset("trajectory/timestep", data=np.array([s.timestep for s in steps], dtype=np.float64))
            file.create_dataset("trajectory/sigma", data=np.array([s.sigma for s in steps], dtype=np.float64))
            file.create_dataset("trajectory/expert", data=[s.expert for s in steps], dtype=_STR)
            for expert, indices in expert_steps.items():
                file.create_dataset(f"experts/{expert}/steps", data=np.array(indices, dtype=np.int32))
        except BaseException:
            if file is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    file.close()
            tmp.unlink(missing_ok=True)
            raise
        return cls(path, file, building=True)

    @classmethod
    def resume(cls, path: Path) -> ProbeWriter:
        """Reopen a complete-structure probe file for its remaining prompts (checked by :func:`open_h5`)."""
        return cls(path, open_h5(path, "r+"), building=False)

    # -- structure (only while building) ------------------------------------------------------

    def has_layers(self, expert: str) -> bool:
        return "layer_table" in self.file[f"experts/{expert}"]

    def create_layers(self, expert: str, layers: dict[str, LayerShape], first_block: dict[str, tuple[int, ...]],
                      outputs: bool = False, yes: bool = False):
        """Allocate every dataset of ``expert`` (called once, during the first prompt); with ``outputs`` also
        the layers' outputs at the sampled rows.

        ``layers`` is ordered: the statistics of all layers are packed along the last axis in
        this order (one write per statistic per step, whatever the number of layers).
        """
        if not self.building:
            raise RuntimeError("the probe file's structure is fixed once its first prompt is complete")
        n_prompts = self.file["prompts/done"].shape[0]
        n_steps = self.file[f"experts/{expert}/steps"].shape[0]
        n_branches = len(json.loads(self.file.attrs["branches"]))
        lead = (n_prompts, n_steps, n_branches)
        shapes = list(layers.values())
        sizes = {
            "channel": [s.in_features for s in shapes],
            "token": [s.tokens for s in shapes],
            "sample": [len(s.sample_rows) * s.in_features for s in shapes],
            "output": [len(s.sample_rows) * s.out_features for s in shapes],
        }
        table = self.file.require_group(f"experts/{expert}/layer_table")
        table.create_dataset("name", data=list(layers), dtype=_STR)
        table.create_dataset("kind", data=[s.kind for s in shapes], dtype=_STR)
        for field_name in ("in_features", "out_features", "params", "tokens"):
            table.create_dataset(field_name, data=np.array([getattr(s, field_name) for s in shapes], dtype=np.int64))
        table.create_dataset("samples", data=np.array([len(s.sample_rows) for s in shapes], dtype=np.int64))
        for key, values in sizes.items():
            table.create_dataset(f"{key}_offset", data=np.concatenate([[0], np.cumsum(values)[:-1]]).astype(np.int64))
        counts = [len(s.sample_rows) for s in shapes]
        table.create_dataset("row_offset", data=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64))
        table.create_dataset("sample_rows", data=np.concatenate([s.sample_rows for s in shapes]).astype(np.int64))
        group = self.file[f"experts/{expert}"]
        stats = (("channel_absmax", "channel"), ("token_absmax", "token"), ("samples", "sample"))
        per_slot = sum(int(sum(sizes[key])) for _, key in stats + ((("outputs", "output"),) if outputs else ()))
        per_slot += sum(int(np.prod(shape)) for shape in first_block.values())
        needed = 4 * per_slot * int(np.prod(lead))
        self.planned_bytes = (self.planned_bytes or 0) + needed
        from sensq.store.files import ensure_free_space

        ensure_free_space(self.path.parent, needed,
                          f"the {expert!r} expert's part of {str(self.path)!r} ({n_prompts} prompts)", yes=yes)
        for stat, key in stats + ((("outputs", "output"),) if outputs else ()):
            _create_allocated(group, stat, lead + (int(sum(sizes[key])),), np.float32)
        block = self.file.require_group(f"experts/{expert}/first_block")
        for name, tensor_shape in first_block.items():
            _create_allocated(block, name, lead + tuple(tensor_shape), np.float32)

    # -- data ----------------------------------------------------------------------------------

    def write_step(self, prompt_slot: int, expert: str, local_step: int, packed: dict[str, np.ndarray],
                   first_block: dict[str, np.ndarray]) -> int:
        """Write one step of one expert, all branches: ``packed[stat]`` is ``[branch, packed size]``.

        Returns the bytes written.
        """
        written = 0
        group = self.file[f"experts/{expert}"]
        for stat, array in packed.items():
            group[stat][prompt_slot, local_step] = array
            written += array.nbytes
        for name, array in first_block.items():
            group["first_block"][name][prompt_slot, local_step] = array
            written += array.nbytes
        return written

    def finish_prompt(self, prompt_slot: int) -> None:
        """Mark a prompt complete, durably; the first one also moves the file into place."""
        self.file["prompts/done"][prompt_slot] = True
        self.file.flush()
        if self.building:
            self.file.close()
            os.replace(self.tmp_path(self.path), self.path)
            self.file = h5py.File(self.path, "r+")
            self.building = False

    def close(self, failed: bool = False) -> None:
        """Close the file. After a failure (``failed``) errors of the close itself are not raised over the
        first one (a full disk fails the flush too), and a file still being built, which holds no complete
        prompt, is removed: the same command starts it again."""
        try:
            if self.file.id.valid:
                self.file.flush()
                self.file.close()
        except (OSError, RuntimeError):
            if not failed:
                raise
            with contextlib.suppress(OSError, RuntimeError):
                self.file.close()
        if failed and self.building:
            self.tmp_path(self.path).unlink(missing_ok=True)
