"""Run folders and checkpoints: one writer per folder (a lock the OS drops when its holder dies),
checkpoints written atomically beside the previous one, read back as plain data only (a file from
someone else never runs code), and resumed only with the arguments that wrote them (a diverged
run keeps its last good one: rlplastic.runs.Run.finite)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from rlplastic.files import (
    FolderError,
    atomic_torch_save,
    make_folder,
    read_failure,
    remove_interrupted_writes,
    safe_torch_load,
)

# Arguments of an agent run that may differ when an interrupted run resumes: they change how it is
# run and logged, not its results.
# Where the run folder lives is not part of a run's identity: a folder moved to another disk resumes.
RESUMABLE_CHANGES = frozenset({"output_dir", "device", "threads", "log_every", "checkpoint_every", "track_tensorboard",
                               "track", "wandb_project_name", "wandb_entity", "save_model", "env_workers"})  # fmt: skip
# Arguments added after runs were already being checkpointed, each with the value that does what those
# runs did: a checkpoint written before an argument existed resumes under that value, and only that one.
ADDED_ARGUMENTS = {"noop_unit": "agent-steps", "reset_rule": "2024"}


def output_dir_problems(output_dir: str | None) -> list[str]:
    """--output-dir must be a folder (or not exist yet) and must not hold a finished run."""
    if output_dir is None:
        return []
    path = Path(output_dir)
    try:
        exists, finished = path.exists(), (path / "results.json").exists()
    except OSError as e:  # e.g. a name longer than the file system allows
        return [f"--output-dir {output_dir}: cannot be used as a folder ({e.strerror or e}); choose another"]
    if exists and not path.is_dir():
        return [f"--output-dir {output_dir}: is a file, not a folder; choose a folder for the run"]
    if finished:
        return [f"--output-dir {output_dir}: already holds a finished run (results.json); choose another folder "
                "or remove it"]  # fmt: skip
    return []


_HELD_FOLDERS: dict[Path, Any] = {}  # folder -> its open lock file, for the life of this process


def hold_run_folder(folder: Path, agent: str) -> None:
    """One writer per run folder: an exclusive flock on `<folder>/.lock`, held until this process
    ends. The OS releases it when the holder dies however it dies (kill -9 included), so a folder
    whose run was killed can be resumed at once; a second process is refused with the live
    holder's PID. Re-entrant within one process (a resumed main() in the same interpreter)."""
    import fcntl

    try:
        make_folder(folder, "--output-dir")
    except FolderError as e:
        sys.exit(f"{agent}: {e}")
    key = folder.resolve()
    if key in _HELD_FOLDERS:
        return
    try:
        lock_file = open(folder / ".lock", "a+")  # noqa: SIM115 (kept open: the lock lives as long as the file)
    except OSError as e:
        sys.exit(f"{agent}: --output-dir {folder}: cannot write in this folder ({e.strerror or e}); choose another")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "unknown"
        lock_file.close()
        sys.exit(f"{agent}: {folder} is in use by a live run (PID {holder}); wait for it to end or choose "
                 "another --output-dir")  # fmt: skip
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(str(os.getpid()))
    lock_file.flush()
    _HELD_FOLDERS[key] = lock_file
    for tmp in remove_interrupted_writes(folder):  # no other writer now: these are a killed one's
        print(f"{agent}: removed {tmp.name}, a file write interrupted in an earlier session", flush=True)


def save_checkpoint(path: Path, payload: Any, agent: str) -> None:
    """atomic_torch_save, and if the write fails (disk full, I/O error) stop with a message: the
    previous checkpoint is untouched, since the new one was written beside it."""
    try:
        atomic_torch_save(path, payload)
    except OSError as e:  # atomic_write's WriteFailure: any exception type the writer raised
        kept = f"the previous checkpoint {path} is kept" if path.exists() else "no earlier checkpoint exists"
        sys.exit(f"{agent}: could not write the checkpoint {path} ({e.strerror or e}); {kept}; free space (or "
                 "make the folder writable) and run the same command again to resume")  # fmt: skip


def read_checkpoint(path: Path, device: torch.device | str, who: str) -> dict | None:
    """The checkpoint in `path` written by save_checkpoint, or None if there is none. A file that is
    not one (truncated, corrupt, foreign, or carrying code: it is read as plain data only) stops the
    run with its name and what to do, never a traceback."""
    if not path.exists():
        return None
    try:
        checkpoint = safe_torch_load(path, device)
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("config"), dict):
            raise ValueError("no run configuration in it")
    except Exception as e:  # any reading failure is the file's fault
        sys.exit(f"{who}: {path} is not a readable checkpoint ({read_failure(e)}); move it away to start the run over")
    return checkpoint


# The layout of agent checkpoints. 2: the Run harness's (objects by name, records, extras);
# 1: each agent's own keys, written before the harness existed.
CHECKPOINT_FORMAT = 2


def load_checkpoint(
    path: Path, config: dict[str, Any], resumable: set[str], device: torch.device, agent: str
) -> dict | None:
    """The checkpoint of an interrupted agent run in `path` (read_checkpoint), or None. One of
    another layout, or written with other arguments than `config` (apart from `resumable` ones),
    stops the run with a message that says why and what to do."""
    checkpoint = read_checkpoint(path, device, agent)
    if checkpoint is None:
        return None
    found = checkpoint.get("format", 1)
    if found != CHECKPOINT_FORMAT:
        sys.exit(
            f"{agent}: {path} is a checkpoint of format {found}, written by "
            f"{'an earlier' if found < CHECKPOINT_FORMAT else 'a later'} rlplastic; this one reads format "
            f"{CHECKPOINT_FORMAT} only (the layout changed with the run harness), so it cannot resume that run: "
            "finish it with the rlplastic version that wrote it, or start over in another --output-dir"
        )
    saved = {**ADDED_ARGUMENTS, **checkpoint["config"]}
    changed = {k for k in config if k not in resumable and saved.get(k) != config[k]}
    if changed:
        sys.exit(
            f"{agent}: {path} was written with other arguments ({', '.join(sorted(changed))}); "
            "resume with the same ones or choose another --output-dir"
        )
    return checkpoint
