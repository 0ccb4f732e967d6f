"""The probe HDF5 file (``sensq.probe/1``): its reader (the writer is :mod:`sensq.store.probe_writer`). Layout in
docs/probe-format.md.

Crash safety: the file is built under ``<name>.tmp`` until the first prompt is complete (the only
time its structure changes), then renamed into place. Every dataset is allocated when it is
created (HDF5 early allocation, contiguous layout, no compression), so later writes change data
only, never metadata; a prompt's ``done`` flag is set and flushed after all its data. A run killed
at any point leaves either no file or a valid one whose ``done`` mask says which prompts are complete.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import h5py
import numpy as np

from sensq.errors import InputError

PROBE_SCHEMA = "sensq.probe/1"
_STR = h5py.string_dtype()
_DAMAGED_FIX = "probe again into a new file (an interrupted probe is completed with --resume)"


def building_path(path: Path) -> Path:
    """Where a probe file is built until its first prompt is complete."""
    return path.with_name(path.name + ".tmp")


def open_h5(path: str | Path, mode: str = "r") -> h5py.File:
    """Open a probe HDF5 file that may come from someone else, refusing anything that reads or writes
    outside the file: external links, soft links (sensq never writes them), datasets with external
    storage, virtual datasets, and filters (which make HDF5 look for plugins). Checked before any data
    is read or written.

    Raises:
        InputError: not HDF5 or damaged; any of the above (named, with the object's path).
    """
    path = Path(path)
    try:
        file = h5py.File(path, mode)
    except OSError as error:
        reason = str(error).split("(", 1)[-1].rstrip(")") if "(" in str(error) else str(error)
        raise InputError(f"{str(path)!r} is not an HDF5 file, or is damaged ({reason}); {_DAMAGED_FIX}") from None
    try:
        _check_contained(file, path)
    except BaseException:
        file.close()
        raise
    return file


def _check_contained(file: h5py.File, path: Path) -> None:
    links: list[tuple[str, int]] = []
    try:
        file.id.links.visit(lambda name, info: links.append((name.decode(errors="replace"), info.type)), info=True)
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        raise InputError(f"{str(path)!r} is damaged ({error}); {_DAMAGED_FIX}") from None
    for name, kind in links:
        if kind == h5py.h5l.TYPE_EXTERNAL:
            raise InputError(f"{str(path)!r} holds an external link at {name!r} (to another file); sensq probe files "
                             "never do: refusing to open it")
        if kind != h5py.h5l.TYPE_HARD:
            raise InputError(f"{str(path)!r} holds a soft or user-defined link at {name!r}; sensq probe files "
                             "never do: refusing to open it")
    problems: list[str] = []

    def visit(name: str, item) -> None:
        if not isinstance(item, h5py.Dataset) or problems:
            return
        dcpl = item.id.get_create_plist()
        if dcpl.get_layout() == h5py.h5d.VIRTUAL:
            problems.append(f"a virtual dataset at {name!r} (its data lives in other files)")
        elif dcpl.get_external_count() > 0:
            problems.append(f"a dataset with external storage at {name!r} (its data lives in another file)")
        elif dcpl.get_nfilters() > 0:
            problems.append(f"a filtered dataset at {name!r} (filters load HDF5 plugins)")

    try:
        file.visititems(visit)
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        raise InputError(f"{str(path)!r} is damaged ({error}); {_DAMAGED_FIX}") from None
    if problems:
        raise InputError(f"{str(path)!r} holds {problems[0]}; sensq probe files never do: refusing to open it")


class ProbeFile:
    """Read-only access to a probe file; what the sensitivity engine and calibration use.

    Raises:
        InputError: missing file, not HDF5, or not ``sensq.probe/1``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            hint = " (an interrupted first prompt leaves only a .tmp: rerun the probe)" if \
                building_path(self.path).exists() else ""
            raise InputError(f"probe file not found: {str(self.path)!r}{hint}")
        self.file = open_h5(self.path, "r")
        self._tables: dict[str, dict] = {}
        schema = self.file.attrs.get("schema")
        if schema != PROBE_SCHEMA:
            self.file.close()
            raise InputError(f"{str(self.path)!r} has schema {schema!r}; expected {PROBE_SCHEMA!r}")
        missing = [key for key in ("experts", "branches", "model_id", "model_fingerprint", "trajectory")
                   if key not in self.file.attrs] + [key for key in ("prompts/done", "prompts/text", "prompts/index",
                                                                     "prompts/seed", "trajectory/step")
                                                     if key not in self.file]
        if missing:
            self.file.close()
            raise InputError(f"{str(self.path)!r} is damaged: it lacks {missing[0]!r}; {_DAMAGED_FIX}")

    def __enter__(self) -> ProbeFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    @contextlib.contextmanager
    def _reading(self, what: str):
        """Turn the errors HDF5 raises on a cut or garbled file into one line naming the file."""
        try:
            yield
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as error:
            if isinstance(error, InputError):
                raise
            raise InputError(f"{str(self.path)!r} is damaged (reading {what} failed: "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}); "
                             f"{_DAMAGED_FIX}") from None

    def attr_json(self, key: str):
        with self._reading(f"the {key!r} attribute"):
            return json.loads(self.file.attrs[key])

    @property
    def model_id(self) -> str:
        return self.file.attrs["model_id"]

    @property
    def model_fingerprint(self) -> str:
        return self.file.attrs["model_fingerprint"]

    @property
    def loras(self) -> dict[str, str]:
        """Expert -> LoRA file fused into the probed model (empty: none; files older than this field: none)."""
        if "loras" not in self.file.attrs:
            return {}
        loras = self.attr_json("loras")
        if not isinstance(loras, dict) or not all(isinstance(v, str) for v in loras.values()):
            raise InputError(f"{str(self.path)!r} is damaged (its 'loras' attribute is not an object of file names); "
                             f"{_DAMAGED_FIX}")
        return loras

    @property
    def experts(self) -> list[str]:
        return self.attr_json("experts")

    @property
    def branches(self) -> list[str]:
        return self.attr_json("branches")

    @property
    def done(self) -> np.ndarray:
        return self.file["prompts/done"][...]

    @property
    def prompt_index(self) -> np.ndarray:
        return self.file["prompts/index"][...]

    @property
    def prompts(self) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else s for s in self.file["prompts/text"][...]]

    @property
    def negatives(self) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else s for s in self.file["prompts/negative"][...]]

    def trajectory_table(self) -> list[dict]:
        table = self.file["trajectory"]
        experts = [e.decode() if isinstance(e, bytes) else e for e in table["expert"][...]]
        return [
            {"step": int(s), "timestep": float(t), "sigma": float(g), "expert": e}
            for s, t, g, e in zip(table["step"][...], table["timestep"][...], table["sigma"][...], experts, strict=True)
        ]

    def steps(self, expert: str) -> np.ndarray:
        """Global step indices that ran on ``expert`` (the second axis of its datasets)."""
        return self.file[f"experts/{expert}/steps"][...]

    def _table(self, expert: str) -> dict[str, dict]:
        with self._reading(f"the {expert!r} layer table"):
            return self._read_table(expert)

    def _read_table(self, expert: str) -> dict[str, dict]:
        if expert not in self._tables:
            table = self.file[f"experts/{expert}/layer_table"]
            columns = {key: table[key][...] for key in table if key != "sample_rows"}
            names = [n.decode() if isinstance(n, bytes) else n for n in columns.pop("name")]
            kinds = [k.decode() if isinstance(k, bytes) else k for k in columns.pop("kind")]
            rows = table["sample_rows"][...]
            self._tables[expert] = {
                name: {"kind": kinds[i], **{key: int(values[i]) for key, values in columns.items()},
                       "sample_rows": rows[columns["row_offset"][i]:columns["row_offset"][i] + columns["samples"][i]]}
                for i, name in enumerate(names)
            }
        return self._tables[expert]

    def layers(self, expert: str) -> list[str]:
        """Layer names of ``expert`` in execution order (empty when the expert was not probed)."""
        if "layer_table" not in self.file[f"experts/{expert}"]:
            return []
        return list(self._table(expert))

    def layer_attrs(self, expert: str, layer: str) -> dict:
        """kind, in_features, out_features, params, tokens, samples, offsets, sample_rows."""
        try:
            return self._table(expert)[layer]
        except KeyError:
            raise InputError(f"layer {layer!r} is not in the {expert!r} expert of {str(self.path)!r}") from None

    def _complete(self) -> np.ndarray:
        done = self.done
        if not done.any():
            raise InputError(f"{str(self.path)!r} holds no complete prompt yet (resume the probe with --resume)")
        return np.flatnonzero(done)

    def read(self, expert: str, layer: str, stat: str) -> np.ndarray:
        """One statistic of one layer over the complete prompts, ``[prompt, step, branch, ...]``:
        ``channel_absmax`` ``[..., in_features]``, ``token_absmax`` ``[..., tokens]``, ``samples``
        ``[..., samples, in_features]``, ``outputs`` ``[..., samples, out_features]`` (probes made with
        ``--outputs``: the layer's output at the sampled rows)."""
        info = self.layer_attrs(expert, layer)
        if stat == "channel_absmax":
            start, shape = info["channel_offset"], (info["in_features"],)
        elif stat == "token_absmax":
            start, shape = info["token_offset"], (info["tokens"],)
        elif stat == "samples":
            start, shape = info["sample_offset"], (info["samples"], info["in_features"])
        elif stat == "outputs" and self.has_outputs(expert):
            start, shape = info["output_offset"], (info["samples"], info["out_features"])
        elif stat == "outputs":
            raise InputError(f"{str(self.path)!r} holds no layer outputs (probe with --outputs to record them)")
        else:
            raise InputError(f"unknown statistic {stat!r}; use channel_absmax, token_absmax, samples or outputs")
        size = int(np.prod(shape))
        with self._reading(f"{stat} of {expert}:{layer}"):
            data = self.file[f"experts/{expert}/{stat}"][self._complete(), :, :, start:start + size]
            data = data.reshape(data.shape[:3] + shape)
        self._check_finite(data, f"the {stat} of {expert}:{layer}")
        return data

    def _check_finite(self, data: np.ndarray, what: str) -> None:
        """Refuse non-finite probe data: a NaN in the captured inputs would rank every layer inf or give NaN
        calibration errors, silently."""
        if not np.isfinite(data).all():
            bad = np.argwhere(~np.isfinite(data))[0]
            prompt = int(self.prompt_index[self._complete()[bad[0]]])
            raise InputError(f"{str(self.path)!r} holds NaN or Inf in {what} (prompt {prompt}, step slot {bad[1]}, "
                             f"branch {bad[2]}); the probed model produced non-finite activations: probe again "
                             "(in fp32, or with fewer or other prompts)")

    def has_outputs(self, expert: str) -> bool:
        """True when the probe recorded the layers' outputs at the sampled rows (``--outputs``)."""
        return "outputs" in self.file[f"experts/{expert}"]

    def first_block(self, expert: str, name: str) -> np.ndarray:
        with self._reading(f"the first-block input {name!r} of {expert}"):
            data = self.file[f"experts/{expert}/first_block/{name}"][self._complete()]
        self._check_finite(data, f"the first-block input {name!r} of {expert}")
        return data
