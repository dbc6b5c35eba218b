"""The machine a run runs on: its device, CPU threads and free memory, seeding, and the commit of
the code that runs. A leaf module: the run recorder, replay, the supervised runner and the agents
import it, and it imports nothing of rlplastic."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

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


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: a Slurm task's share, a taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cpu_threads(requested: int) -> int:
    """Torch's CPU threads for a process: `requested` when > 0; else OMP_NUM_THREADS when set (a
    launcher sharing the cores out among processes, as the sweep's local launcher does); else the
    cores this process may use (the runs of one process update one after another, never at once).
    Torch's own default, a thread per core in every process, oversubscribes the cores as soon as two
    processes share them: scripts/bench_threads.py measures both."""
    if requested > 0:
        return requested
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    return available_cores()


def set_cpu_threads(requested: int) -> int:
    """torch.set_num_threads(cpu_threads(requested)); the number set."""
    threads = cpu_threads(requested)
    torch.set_num_threads(threads)
    return threads


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


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit of the checkout holding `path` (+ '-dirty' with local changes), or None.
    RLPLASTIC_GIT_COMMIT, when set, is taken instead: the commit a copied tree came from, on a
    machine whose copy carries no or stale git history (a lent GPU machine: scripts/gpu_check.sh)."""
    if os.environ.get("RLPLASTIC_GIT_COMMIT"):
        return os.environ["RLPLASTIC_GIT_COMMIT"]
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
