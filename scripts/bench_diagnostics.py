"""Cost of the plasticity probe on the DrQ network, and its share of a DrQ run at the default interval.

    python scripts/bench_diagnostics.py [--device cpu|cuda]

Share = probe time / (diag_every * (env step + update) time). Goal: <= 2% of training time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

from rlplastic.agent_files import load_agent
from rlplastic.bench import drq_update_seconds, synchronize, time_env_steps
from rlplastic.cli import replace_flags
from rlplastic.diagnostics import PlasticityProbe
from rlplastic.machine import resolve_device

drq = load_agent("drq")


@dataclass
class BenchArgs:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """device of the network"""
    calls: int = 5
    """probe calls timed"""
    updates: int = 100
    """updates timed for the per-step cost"""


def main(bench: BenchArgs) -> None:
    device = resolve_device(bench.device)
    args = replace_flags(drq.Args(), device=bench.device)
    q_network = drq.QNetwork(4).to(device)
    probe = PlasticityProbe(
        q_network, torch.randint(0, 255, (args.run.diag_batch, 4, 84, 84), dtype=torch.uint8, device=device)
    )
    probe.measure()  # warm-up: fx trace, allocations
    synchronize(device)
    start = time.perf_counter()
    for _ in range(bench.calls):
        metrics = probe.measure()
    probe_time = (time.perf_counter() - start) / bench.calls
    step_time = time_env_steps("Breakout", 2_000) + drq_update_seconds(drq, args, device, 4, bench.updates)
    share = probe_time / (args.run.diag_every * step_time)
    print(f"bench_diagnostics on {device}, torch {torch.__version__}")
    shape = f"{args.run.diag_batch} states, {len(metrics)} values, {len(probe.pairs)} hidden layers"
    print(f"probe call ({shape}): {1000 * probe_time:.1f} ms")
    print(f"agent step (env + update): {1000 * step_time:.1f} ms")
    print(f"share of a DrQ run at --diag-every {args.run.diag_every}: {100 * share:.3f}%  (goal <= 2%)")


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
