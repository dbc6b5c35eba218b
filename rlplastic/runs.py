"""What every run needs around its loop: device, seeding, run folder, atomic results, progress."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when present, else cpu. Asking for cuda without one is an error."""
    if name not in DEVICE_CHOICES:
        raise ValueError(f"unknown device {name!r}; allowed: {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def device_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator for sampling and augmentation on the device, independent of the global one."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call write(file) on a temp file in the same folder, fsync, then rename over `path`: readers
    never see half a file, and an interrupted write leaves the old one intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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
    torch.load(weights_only=True) reads back. numpy arrays travel as tagged tensors."""
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


# Arguments of an agent run that may differ when an interrupted run resumes: they change how it is
# run and logged, not its results. Agents add their own (DrQ's --save-model).
RESUMABLE_CHANGES = frozenset(
    {"device", "log_every", "checkpoint_every", "track_tensorboard", "track", "wandb_project_name", "wandb_entity"}
)


def output_dir_problems(output_dir: str | None) -> list[str]:
    """--output-dir must be a folder (or not exist yet) and must not hold a finished run."""
    if output_dir is None:
        return []
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        return [f"--output-dir {output_dir}: is a file, not a folder; choose a folder for the run"]
    if (path / "results.json").exists():
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

    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _HELD_FOLDERS:
        return
    lock_file = open(folder / ".lock", "a+")  # noqa: SIM115 (kept open: the lock lives as long as the file)
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


def save_checkpoint(path: Path, payload: Any, agent: str) -> None:
    """atomic_torch_save, and if the write fails (disk full, I/O error) stop with a message: the
    previous checkpoint is untouched, since the new one was written beside it."""
    try:
        atomic_torch_save(path, payload)
    except OSError as e:
        kept = f"the previous checkpoint {path} is kept" if path.exists() else "no earlier checkpoint exists"
        sys.exit(f"{agent}: could not write the checkpoint {path} ({e.strerror or e}); {kept}; free space and run "
                 "the same command again to resume")  # fmt: skip


def memory_problem(needed_bytes: int, device: torch.device, what: str) -> str | None:
    """A refusal when `needed_bytes` will not fit in the free memory of `device` (the host's
    available RAM for the CPU, torch.cuda.mem_get_info for a GPU), else None."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            meminfo = Path("/proc/meminfo").read_text()
            free = int(next(line for line in meminfo.splitlines() if line.startswith("MemAvailable")).split()[1]) * 1024
        except (OSError, StopIteration, ValueError):
            return None  # no way to tell on this system: do not refuse
    if needed_bytes > free:
        return (f"{what} needs {needed_bytes / 2**30:.2f} GiB but {device} has {free / 2**30:.2f} GiB free; "
                "make it smaller")  # fmt: skip
    return None


def read_failure(error: Exception) -> str:
    """'ErrorType: its first line' (200 characters at most): why a file could not be read."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {(lines[0] if lines else type(error).__name__)[:200]}"


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


def load_checkpoint(
    path: Path, config: dict[str, Any], resumable: set[str], device: torch.device, agent: str
) -> dict | None:
    """The checkpoint of an interrupted agent run in `path` (read_checkpoint), or None; resuming with
    other arguments than the ones it was written with (apart from `resumable` ones) exits with a
    message."""
    checkpoint = read_checkpoint(path, device, agent)
    if checkpoint is None:
        return None
    changed = {k for k in config if k not in resumable and checkpoint["config"].get(k) != config[k]}
    if changed:
        sys.exit(
            f"{agent}: {path} was written with other arguments ({', '.join(sorted(changed))}); "
            "resume with the same ones or choose another --output-dir"
        )
    return checkpoint


def stop_if_not_finite(agent: str, losses: dict[str, float], step: int, checkpoint_path: Path) -> None:
    """Stop a diverged run where its losses are read anyway: say at which step and which loss,
    keep the last good checkpoint, write no results.json, exit non-zero."""
    bad = {key: value for key, value in losses.items() if not math.isfinite(value)}
    if bad:
        kept = (
            f"the last good checkpoint {checkpoint_path} is kept" if checkpoint_path.exists() else "no checkpoint yet"
        )
        sys.exit(f"{agent}: training diverged by step {step} ({bad}); {kept}; no results written")


def random_states(rng: np.random.Generator, generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every random state a run draws from, for its checkpoint (fresh re-inits of interventions draw
    from torch's global generator, sampling and augmentation from `generator`, acting from `rng`)."""
    return {
        "rng": rng.bit_generator.state,
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
    }


def restore_random_states(states: dict[str, Any], rng: np.random.Generator, generator: torch.Generator) -> None:
    rng.bit_generator.state = states["rng"]
    generator.set_state(states["generator"].cpu())
    torch.set_rng_state(states["torch_rng"].cpu())
    if states["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda_rng"]])


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit of the checkout holding `path` (+ '-dirty' with local changes), or None."""
    cwd = Path(path or __file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def tracking_problems(track: bool, track_tensorboard: bool) -> list[str]:
    """--track (Weights & Biases, CleanRL's convention) needs wandb installed and tensorboard on,
    since it syncs the tensorboard scalars."""
    if not track:
        return []
    problems = []
    if importlib.util.find_spec("wandb") is None:
        problems.append("--track needs wandb, which is not installed: pip install 'rlplastic[track]' (or wandb)")
    if not track_tensorboard:
        problems.append("--track syncs the tensorboard scalars: drop --no-track-tensorboard")
    return problems


def start_tracking(project: str, entity: str | None, run_dir: Path, run_name: str, config: dict) -> None:
    """Log the run to Weights & Biases as CleanRL does: wandb.init(sync_tensorboard=True) before the
    SummaryWriter is made, so every tensorboard scalar is also sent. The wandb run id is the run
    folder's name, so a resumed run continues the same wandb run."""
    import wandb

    wandb.init(project=project, entity=entity, sync_tensorboard=True, config=config, name=run_name,
               dir=str(run_dir), id=run_dir.resolve().name, resume="allow", save_code=False)  # fmt: skip


def log_final_evaluation(writer, returns: list[float], mean: float, step: int) -> None:
    """The final evaluation in tensorboard: eval/mean_return at the last step and, as CleanRL logs
    it, every episode's return as eval/episodic_return with the episode's index as its x value."""
    if not returns:
        return
    writer.add_scalar("eval/mean_return", mean, step)
    for episode, episode_return in enumerate(returns):
        writer.add_scalar("eval/episodic_return", episode_return, episode)


def hparams_markdown(config: dict[str, Any]) -> str:
    """The hyperparameter table CleanRL puts in tensorboard's text tab."""
    rows = "\n".join(f"|{key}|{value}|" for key, value in config.items())
    return f"|param|value|\n|-|-|\n{rows}"


class Progress:
    """One line every `every` steps: step, share done, steps/s, ETA and whatever the caller adds."""

    def __init__(self, total: int, every: int, start: int = 0, stream=sys.stdout):
        self.total, self.every, self.stream = total, max(1, every), stream
        self.start_time = self.last_time = time.perf_counter()
        self.last_step = start

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def steps_per_second(self, step: int) -> float:
        """Rate since the previous report."""
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        return rate

    def report(self, step: int, rate: float, **fields: Any) -> None:
        elapsed = time.perf_counter() - self.start_time
        eta = (self.total - step) / max(rate, 1e-9)  # recent rate: warm-up steps without updates are fast
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        print(
            f"step {step}/{self.total} ({100 * step / self.total:.0f}%) {rate:.0f} steps/s "
            f"elapsed {elapsed / 60:.1f}m eta {eta / 60:.1f}m {extra}",
            file=self.stream,
            flush=True,
        )
