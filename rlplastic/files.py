"""Files that are written whole or not at all, and read as plain data only: results and
checkpoints. A file received from someone else can never run code when it is read."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch


class FolderError(ValueError):
    """A folder given on the command line that cannot be made."""


def make_folder(path: str | os.PathLike, flag: str) -> Path:
    """mkdir -p `path`, given by `flag`; a folder that cannot be made (a file in the way, no such
    parent, no permission, a read-only file system) raises FolderError naming the flag, the path
    and the reason, so that a command can refuse it before any work instead of losing that work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FolderError(f"{flag} {path}: cannot make this folder ({e.strerror or e}); choose another") from None
    return path


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
    permissions open() would give it (mkstemp's are owner-only: colleagues could not read results)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
