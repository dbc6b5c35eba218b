"""CPU threads and DrQ updates: updates/s of one run alone and of two runs side by side (two
processes on the same cores, as two evidence runs or a run beside the tests), each with one thread,
with torch's own default (a thread per core in every process) and with the agents' default
(--threads 0: rlplastic.machine.cpu_threads).

    python scripts/bench_threads.py                 # about 2 minutes on 2 cores
    python scripts/bench_threads.py --updates 100

Prints one row per setting: threads per process, updates/s alone, updates/s of each of two side by
side, and the two together. Run it on an otherwise idle machine: anything else running is a third
process on the same cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import tyro

SETTINGS = {"one thread": "1", "torch's default": "torch", "agents' default (--threads 0)": "0"}


@dataclass
class BenchArgs:
    updates: int = 60
    """timed updates per measurement (after 5 untimed ones)"""
    worker: str | None = None
    """internal: measure in this process with this thread setting (1, torch or 0) and print updates/s"""


def measure(setting: str, updates: int) -> float:
    """Updates/s of one DrQ update (batch 32, the agent's network) on the CPU, with `setting` threads."""
    import torch

    from rlplastic.agent_files import load_agent
    from rlplastic.bench import drq_update_seconds
    from rlplastic.cli import replace_flags
    from rlplastic.machine import set_cpu_threads

    if setting != "torch":
        set_cpu_threads(int(setting))
    drq = load_agent("drq")
    args = replace_flags(drq.Args(), buffer_size=2_000, device="cpu")
    return 1.0 / drq_update_seconds(drq, args, torch.device("cpu"), num_actions=4, updates=updates)


def side_by_side(setting: str, processes: int, updates: int) -> list[float]:
    """Updates/s of each of `processes` measuring processes started together."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    command = [sys.executable, __file__, "--worker", setting, "--updates", str(updates)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) for _ in range(processes)]
    return [float(proc.communicate()[0].split()[-1]) for proc in procs]


def main(args: BenchArgs) -> None:
    if args.worker is not None:
        print(f"{measure(args.worker, args.updates):.3f}")
        return
    import torch

    from rlplastic.machine import available_cores, cpu_threads

    print(f"{available_cores()} cores available; torch's default: {torch.get_num_threads()} thread(s) per process; "
          f"agents' default: {cpu_threads(0)} (OMP_NUM_THREADS unset)")  # fmt: skip
    print("| threads per process | alone, updates/s | two side by side, updates/s each | together |")
    print("|---|---|---|---|")
    for name, setting in SETTINGS.items():
        alone = side_by_side(setting, 1, args.updates)[0]
        pair = side_by_side(setting, 2, args.updates)
        each = " / ".join(f"{rate:.1f}" for rate in pair)
        print(f"| {name} | {alone:.1f} | {each} | {sum(pair):.1f} |", flush=True)


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
