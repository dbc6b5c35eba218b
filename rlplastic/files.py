"""Files that are written whole or not at all, and read as plain data only: results and
checkpoints. A file received from someone else can never run code when it is read."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch


class FolderError(ValueError):
    """A folder given on the command line that cannot be made."""


def make_folder(path: str | os.PathLike, flag: str) -> Path:
    """mkdir -p `path`, given by `flag`, and check that files can be written in it; a folder that
    cannot be made or written (a file in the way, no such parent, no permission, a read-only file
    system, a name too long, a full disk) raises FolderError naming the flag, the path and the
    reason, so that a command can refuse it before any work instead of losing that work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=path)
        try:
            os.write(fd, b"probe\n")  # a full disk refuses the first block
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise FolderError(f"{flag} {path}: cannot write in this folder ({e.strerror or e}); choose another") from None
    return path


def file_destination_problem(path: str | os.PathLike, flag: str) -> str | None:
    """Why the file `path` (given by `flag`) could not be written, checked before any work: its
    folder cannot be made or written (make_folder), the name is too long for the file system, or it
    is a folder. None when it can."""
    path = Path(path)
    try:
        if path.is_dir():
            return f"{flag} {path}: is a folder; give a file"
        make_folder(path.parent, flag)
        max_name = os.pathconf(path.parent, "PC_NAME_MAX")
    except FolderError as e:
        return str(e)
    except OSError as e:
        return f"{flag} {path}: cannot be written ({e.strerror or e}); choose another"
    if len(os.fsencode(path.name)) + len(".lock") > max_name:
        return f"{flag} {path}: the file name is longer than this file system allows ({max_name} bytes); choose another"
    return None


class WriteFailure(OSError):
    """A file that could not be written (full disk, read-only file system, I/O error), whatever
    exception the writer raised: torch.save reports a full disk as a RuntimeError ("unexpected pos",
    "file write failed"). Its message names the path and the reason; the previous file is intact."""


def write_failure(path: Path, error: BaseException) -> WriteFailure:
    """`error`, raised while writing `path`, as a WriteFailure with the reason in plain words."""
    if isinstance(error, OSError) and error.errno is not None:
        reason, errno_ = error.strerror or str(error), error.errno
    else:
        reason, errno_ = read_failure(error), None
        with contextlib.suppress(OSError):  # a writer that hid the errno: ask the file system
            stats = os.statvfs(path.parent)
            if stats.f_bavail * stats.f_frsize < 1 << 20:
                reason, errno_ = os.strerror(errno.ENOSPC), errno.ENOSPC
    failure = WriteFailure(errno_, f"cannot write {path}: {reason}")
    failure.filename = str(path)
    return failure


class ResumeError(ValueError):
    """An experiment's results file that belongs to other settings (or cannot be read): going on
    would overwrite it."""


def save_runs(path: str | os.PathLike, settings: dict[str, Any], results: dict[str, Any], complete: bool) -> None:
    """An experiment's JSON file as finished_runs reads it: {**settings, **results (its runs so far
    under one key, and whatever else it reports), "complete": complete}; saved after every run."""
    atomic_write_json(path, {**settings, **results, "complete": complete})


def finished_runs(path: str | os.PathLike, settings: dict[str, Any], runs_key: str, flag: str) -> dict[str, Any]:
    """The runs an earlier invocation with the same `settings` saved in the JSON file `path` (under
    `runs_key`, by save_runs), so that a command killed half-way goes on where it stopped instead of
    losing what it had; {} when there is no such file. A file written with other settings, or
    unreadable, is refused (ResumeError naming the setting that differs and `flag`): overwriting it
    would lose it."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ResumeError(f"{flag} {path.parent}: {path.name} cannot be read ({read_failure(e)}); "
                          f"move it away or choose another {flag}") from None  # fmt: skip
    if not isinstance(saved, dict) or not isinstance(saved.get(runs_key), dict):
        raise ResumeError(f"{flag} {path.parent}: {path.name} is not a results file of this experiment; "
                          f"move it away or choose another {flag}")  # fmt: skip
    wanted = json.loads(json.dumps(settings))  # tuples as lists, as the file holds them
    differ = [key for key, value in wanted.items() if saved.get(key) != value]
    if differ:
        raise ResumeError(f"{flag} {path.parent}: {path.name} holds the results of other settings (not the "
                          f"same: {', '.join(differ)}); it is kept: move it away or choose another {flag}")  # fmt: skip
    return saved[runs_key]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() gives a new file; read once, at import (umask is per process)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call write(file) on a temp file in the same folder, fsync, then rename over `path`: readers
    never see half a file, and an interrupted write leaves the old one intact. The file gets the
    permissions open() would give it (mkstemp's are owner-only: colleagues could not read results).
    Any failure to write (OSError, or the RuntimeError torch.save raises on a full disk) comes out
    as a WriteFailure naming the path and the reason."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        failure = write_failure(path, e)  # while the temp file still fills the disk
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise failure from e
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


TEMP_SUFFIX = ".tmp"  # atomic_write's temp files: .{name}.{random}.tmp beside the file


def remove_interrupted_writes(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files that atomic_write left in `folder` when its process was killed mid-write
    (up to a checkpoint's size each). Call it only while holding the folder (no live writer)."""
    removed = []
    for tmp in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


class TornLineWarning(UserWarning):
    """A JSON-lines file whose last line was cut short by a writer that died mid-line."""


@contextlib.contextmanager
def locked(path: str | os.PathLike):
    """An exclusive flock on `path`.lock (made if missing), released on exit or when the process
    dies: one writer of `path` at a time, across processes."""
    import fcntl

    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def append_line(path: str | os.PathLike, row: Any) -> None:
    """Append `row` as one JSON line to `path`, never rewriting what is there: one writer at a time
    (locked), one O_APPEND write, fsync'd, so concurrent writers all land and a crash loses at most
    the line being written. A torn last line (a writer killed mid-line) is kept as it is, closed
    with a newline so the new line stays whole, and reported (TornLineWarning naming the line);
    read_jsonl refuses it with its line number."""
    path = Path(path)
    line = json.dumps(row).encode() + b"\n"
    try:
        with locked(path):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, _FILE_MODE)
            try:
                size = os.fstat(fd).st_size
                if size and not _ends_with_newline(path, size):
                    warnings.warn(f"{path}: its last line (line {_count_lines(path)}) was cut short by a writer "
                                  "that stopped mid-line; it is kept, and the new line starts after it",
                                  TornLineWarning, stacklevel=2)  # fmt: skip
                    line = b"\n" + line
                if os.write(fd, line) != len(line):  # a full disk takes part of it: take that back
                    os.ftruncate(fd, size)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as e:
        raise write_failure(path, e) from e


def _ends_with_newline(path: Path, size: int) -> bool:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=2).encode()))


_NDARRAY = "__ndarray__"


def to_plain(obj: Any) -> Any:
    """Tensors, Python scalars, strings, None and dicts / lists / tuples of them: what
    torch.load(weights_only=True) reads back. numpy arrays travel as tagged tensors. A tensor that
    views part of a larger storage travels as its own copy: torch.save writes a view's whole
    storage, so a run of a batch (its parameters are views of all runs' stacked tensors) would
    save every run's weights, and a replay's first rows its whole capacity."""
    if isinstance(obj, torch.Tensor) and obj.untyped_storage().nbytes() > obj.numel() * obj.element_size():
        return obj.clone(memory_format=torch.contiguous_format)
    if isinstance(obj, np.ndarray):
        return {_NDARRAY: torch.from_numpy(np.ascontiguousarray(obj))}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, str) and type(obj) is not str:  # e.g. torch.__version__, a TorchVersion
        return str(obj)
    if isinstance(obj, dict):
        return {key: to_plain(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_plain(value) for value in obj)
    return obj


def from_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        if len(obj) == 1 and _NDARRAY in obj:
            return obj[_NDARRAY].cpu().numpy()
        return {key: from_plain(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(from_plain(value) for value in obj)
    return obj


def atomic_torch_save(path: str | os.PathLike, payload: Any) -> None:
    """Save plain data (see to_plain) atomically: loadable with weights_only=True, so a checkpoint
    received from someone else can never run code when it is read."""
    atomic_write(path, lambda f: torch.save(to_plain(payload), f))


class UnsafeFileError(ValueError):
    """A file that is not plain data: loading it would need to run code from it."""


def safe_torch_load(path: str | os.PathLike, device: torch.device | str = "cpu") -> Any:
    """Read a file written by atomic_torch_save. torch.load(weights_only=True) refuses any pickled
    object that is not plain data instead of running it; that refusal is re-worded so that it never
    suggests loading the file with weights_only=False."""
    import pickle

    try:
        return from_plain(torch.load(path, map_location=device, weights_only=True))
    except pickle.UnpicklingError:
        raise UnsafeFileError(
            f"{path} holds more than plain tensors and numbers (or is no torch file at all): it is not loaded, "
            "since reading it could run code"
        ) from None


def read_failure(error: Exception) -> str:
    """'ErrorType: its first line' (200 characters at most): why a file could not be read."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {(lines[0] if lines else type(error).__name__)[:200]}"
