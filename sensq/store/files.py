"""Small file helpers every sensq output uses: atomic writes under unique temporary names, output
guards (sensq replaces only what it wrote itself), locks against two writers, free-space checks,
and schema-checked JSON documents.

The rules every writer follows (docs/threat-model.md):

* A file or folder is written under a unique temporary name next to its target and renamed into
  place when complete: readers and a later run never see half an output.
* An existing target is replaced only when sensq recognises it as its own output of the same kind
  (by its schema); anything else is refused with one line. ``.``, ``/`` and the home folder are
  never an output folder.
* The old output stays until the new one is complete.
* While a command writes an output it holds ``.<name>.lock`` next to it (``fcntl.flock``: released by
  the kernel when the process dies, so a crash never leaves a stale lock).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sensq.errors import InputError, OutputError
from sensq.store.interrupts import check_interrupted


def is_disk_full(error: BaseException) -> bool:
    """An ENOSPC, also as HDF5 and safetensors report it (the errno inside their messages)."""
    return getattr(error, "errno", None) == errno.ENOSPC or any(text in str(error)
                                                                 for text in ("errno = 28", "os error 28"))


def describe_os_error(error: BaseException, path: str | Path, needed: int | None = None) -> str:
    """One line for an OSError (or a library's wrapped one) met while writing ``path``: what, where, and the fix
    (``needed``: the bytes the output takes, when known)."""
    where = repr(str(path))
    if is_disk_full(error):
        free = _free_bytes(Path(path))
        wanted = f", about {needed / 1e6:.1f} MB needed" if needed else ""
        return (f"disk full while writing {where} ({free / 1e6:.1f} MB free{wanted}); free some space and run the "
                "same command again (what was complete is kept)")
    code = getattr(error, "errno", None)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where}: {error.strerror}; choose another --out or fix the permissions"
    if code == errno.EISDIR:
        return f"cannot write {where}: it is a folder; choose another --out"
    if code == errno.ENOTDIR:
        return f"cannot write {where}: a part of that path is a file, not a folder; choose another --out"
    return f"cannot write {where}: {getattr(error, 'strerror', None) or error}"


def _free_bytes(path: Path) -> int:
    for candidate in (path, *path.parents):
        with contextlib.suppress(OSError):
            if candidate.exists():
                return shutil.disk_usage(candidate).free
    return 0


def temporary_sibling(path: str | Path, suffix: str = ".tmp") -> Path:
    """A unique, not yet existing name next to ``path`` (hidden, ``.<name>.<random><suffix>``)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.unlink(name)
    return Path(name)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a unique temporary file and a rename: readers never see half a
    file, two writers never share a temporary file.

    Raises:
        OutputError: the folder is missing or unwritable, the disk is full (nothing is left behind).
    """
    path = Path(path)
    check_interrupted()  # a command interrupted on the way does not write its output after all
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp_name, path)
    except OSError as error:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
        raise OutputError(describe_os_error(error, path)) from None


def write_json(path: str | Path, data: dict) -> None:
    """Atomically write ``data`` as indented JSON (NaN/inf allowed, as Python's json writes them)."""
    atomic_write_bytes(path, json.dumps(data, indent=1, allow_nan=True).encode())


def parse_json(path: Path, kind: str):
    """The JSON value of an existing file: every reader of sensq's JSON files parses through here.

    Raises:
        InputError: not UTF-8, invalid JSON, or nested too deeply to parse (the message names ``kind``).
    """
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{str(path)!r} is not a {kind} file (not UTF-8 text)") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{str(path)!r} is not valid JSON: {error}") from None
    except RecursionError:
        raise InputError(f"{str(path)!r} is not a {kind} file (nested too deeply)") from None


def read_json(path: str | Path, schema: str, kind: str) -> dict:
    """Read a sensq JSON document and check its ``schema``.

    Raises:
        InputError: missing file, not UTF-8, invalid JSON, not an object, or another schema (the message
            names ``kind``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{kind} file not found: {str(path)!r}")
    data = parse_json(path, kind)
    if not isinstance(data, dict) or data.get("schema") != schema:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{str(path)!r} has schema {found!r}; expected {schema!r} (a {kind} file)")
    return data


def json_schema_of(path: str | Path) -> str | None:
    """The ``schema`` of a JSON file, or None when it is not a readable JSON object with one."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    schema = data.get("schema") if isinstance(data, dict) else None
    return schema if isinstance(schema, str) else None


def file_digest(path: str | Path, length: int = 16) -> str:
    """SHA-256 of a file's bytes (hex, first ``length`` digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


# -- output guards -------------------------------------------------------------------------------


def _forbidden_folder(path: Path) -> bool:
    resolved = path.expanduser().resolve()
    return resolved in {Path("/").resolve(), Path.cwd().resolve(), Path.home().resolve()} or resolved.parent == resolved


def check_output_file(path: str | Path, schema: str | None, kind: str, *, recognise=None) -> Path:
    """Check, before any work, that ``path`` can take a new ``kind`` file: its folder exists and is
    writable, and an existing file there is sensq's own ``schema`` document (replaced), or, with
    ``schema=None``, one that ``recognise(path)`` says sensq wrote.

    Raises:
        OutputError: a missing or unwritable folder, a folder at ``path``, someone else's file.
    """
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise OutputError(f"--out {str(path)!r} is a folder; give a file name such as {str(path / 'out.json')!r}")
    if not parent.is_dir():
        what = "is a file" if parent.exists() else "does not exist"
        raise OutputError(f"cannot write {str(path)!r}: the folder {str(parent)!r} {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {str(path)!r}: the folder {str(parent)!r} is not writable")
    if path.exists():
        if not path.is_file():
            raise OutputError(f"--out {str(path)!r} exists and is not a regular file; choose another --out")
        own = recognise(path) if recognise is not None else (schema is not None and json_schema_of(path) == schema)
        if not own:
            raise OutputError(f"{str(path)!r} exists and is not a {kind} file sensq wrote; choose another --out "
                              "(or move that file away)")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"cannot write {str(path)!r}: the file is read-only")
    return path


def check_output_folder(path: str | Path, marker: str, schema: str, kind: str) -> Path:
    """Check, before any work, that the folder ``path`` can take a ``kind``: missing, empty, or one that
    sensq wrote (``marker`` inside it has ``schema``, or the folder was claimed for it by
    :func:`claim_output_folder`). Never ``.``, ``/`` or the home folder, never a file.

    Raises:
        OutputError: any other existing folder or file, an unwritable parent.
    """
    path = Path(path)
    if _forbidden_folder(path):
        raise OutputError(f"--out {str(path)!r} is the current, home or root folder; sensq writes its outputs into a "
                          "folder of their own: give a new folder name")
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {str(path)!r} is a file, not a folder; choose another --out")
    if path.is_dir() and any(path.iterdir()):
        found = {json_schema_of(path / marker) if (path / marker).is_file() else None, _claimed_kind(path)}
        if schema not in found:
            raise OutputError(f"{str(path)!r} exists and is not a {kind} sensq wrote (no {marker} with schema "
                              f"{schema!r}); it is left as it is: choose another --out")
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise OutputError(f"cannot write {str(path)!r}: {str(candidate)!r} is a file")
            if not os.access(candidate, os.W_OK | os.X_OK):
                raise OutputError(f"cannot write {str(path)!r}: the folder {str(candidate)!r} is not writable")
            break
    return path


CLAIM_FILE = ".sensq-output.json"
"""Written first into an output folder that fills up over a long run (ablations, reports, the demo), so
that an interrupted run's folder is still recognised as sensq's own."""


def _claimed_kind(path: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((path / CLAIM_FILE).read_bytes().decode("utf-8")).get("kind")
    return None


def claim_output_folder(path: str | Path, marker: str, schema: str, kind: str) -> Path:
    """Check (:func:`check_output_folder`), create ``path`` and mark it at once as sensq's ``schema`` output
    (whose complete form holds ``marker``), so that an interrupted run's folder is recognised later.

    Raises:
        OutputError: as :func:`check_output_folder`; the folder cannot be created.
    """
    path = check_output_folder(path, marker, schema, kind)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(describe_os_error(error, path)) from None
    if _claimed_kind(path) != schema:
        write_json(path / CLAIM_FILE, {"schema": "sensq.output/1", "kind": schema})
    return path


def remove_stale_siblings(out: Path) -> list[Path]:
    """Remove the temporary folders a killed writer of ``out`` left next to it (``.<name>.<random>.tmp`` and
    ``.old``, made by :func:`temporary_sibling`). Call it only while holding ``out``'s lock: then no other
    writer can be using them. Returns what was removed."""
    removed = []
    for suffix in (".tmp", ".old"):
        for stale in out.parent.glob(f".{glob.escape(out.name)}.*{suffix}"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
    return removed


def make_parent(path: Path) -> None:
    """Create the folder that will hold ``path`` (and its parents).

    Raises:
        OutputError: it cannot be created (a file in the way, permissions, a full disk).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(describe_os_error(error, path)) from None


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the complete folder ``tmp`` to ``out``, keeping an existing ``out`` until the move is done
    (it is renamed aside, then removed): at every moment a complete folder exists on disk."""
    check_interrupted()
    aside = None
    if out.exists():
        aside = temporary_sibling(out, ".old")
        os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except OSError:
        if aside is not None:
            os.replace(aside, out)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def ensure_free_space(path: str | Path, needed: int, what: str, *, yes: bool = False) -> None:
    """Refuse an output estimated at ``needed`` bytes when the disk holding ``path`` has less free.

    Raises:
        OutputError: not enough free space (unless ``yes``).
    """
    free = _free_bytes(Path(path))
    if needed > free and not yes:
        raise OutputError(f"{what} needs about {needed / 1e9:.2f} GB but {str(path)!r} has {free / 1e9:.2f} GB free; "
                          "free space, use fewer prompts/tokens, or pass --yes to try anyway")


@contextlib.contextmanager
def output_lock(path: str | Path) -> Iterator[None]:
    """Hold ``.<name>.lock`` next to ``path`` while writing it; a second writer is refused at once.

    Raises:
        OutputError: another process holds the lock (its pid is named).
    """
    import fcntl

    path = Path(path)
    parent = path.parent
    lock_path = parent / f".{path.name}.lock"
    if not parent.is_dir():
        raise OutputError(f"output folder {str(parent)!r} does not exist" if not parent.exists() else
                          f"cannot write {str(path)!r}: {str(parent)!r} is a file")
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputError(describe_os_error(error, lock_path)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="ignore").strip() or "?"
            os.close(fd)
            raise OutputError(f"another sensq command (pid {holder}) is writing {str(path)!r}; wait for it to finish "
                              "or use another --out") from None
        # the holder before us may have removed the lock file after we opened it: lock the file on disk
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def inside(folder: str | Path, relative: object, what: str) -> Path:
    """``folder / relative`` when ``relative`` is a relative path string that stays inside ``folder``
    (no ``..``, not absolute, no link leading out).

    Raises:
        InputError: anything else (the value is named; whether the target exists is not revealed).
    """
    folder = Path(folder)
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise InputError(f"{what} {relative!r} in {str(folder)!r} is not a file name")
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise InputError(f"{what} {relative!r} in {str(folder)!r} points outside its folder; refusing to read it")
    resolved = (folder / candidate).resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise InputError(f"{what} {relative!r} in {str(folder)!r} leads outside its folder (a link); refusing to "
                         "read it")
    return folder / candidate
