"""Where DrQ's time goes, measured in one run on the current device.

    python scripts/bench_drq.py                  # auto device, Breakout
    python scripts/bench_drq.py --device cuda --full-steps 3000

Prints env steps/s alone (gymnasium path, and ale-py's AtariVectorEnv for comparison), updates/s
alone, environments of 8 runs stepped in worker processes, batched updates of N runs (one vmapped
update; and each run's own update side by side, --batched-update concurrent: run-updates/s and the
projected hours of the 26 x 5 table, its environments in the workers; and the floor its final
evaluations add: their environment steps at the workers' rate),
the full training loop's steps/s, and ratio = ideal / full time, where the ideal spends exactly
(env step + update) per step and nothing else. Goal: ratio >= 0.85 on the CPU.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro
from rlplastic.envs.atari import canonical_game, make_atari100k_env

from rlplastic.agent_files import load_agent
from rlplastic.bench import (
    device_name,
    drq_batched_update_seconds,
    drq_concurrent_update_seconds,
    drq_update_seconds,
    time_env_steps,
    time_worker_env_steps,
)
from rlplastic.cli import replace_flags
from rlplastic.cuda_graphs import graph_capture_available
from rlplastic.machine import resolve_device

drq = load_agent("drq")


@dataclass
class BenchArgs:
    env_id: str = "Breakout"
    """game to step"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """device of the network and replay"""
    env_steps: int = 3_000
    """steps for the env-alone measurement"""
    updates: int = 200
    """updates for the update-alone measurement"""
    full_steps: int = 400
    """agent steps of the full loop (all but the first `learning_starts` do an update)"""
    learning_starts: int = 50
    """random steps before updates begin in the full loop"""
    batched: tuple[int, ...] = (1, 8, 32, 128)
    """runs per batched update to time (agents/drq.py --env-id ... --seed ...: one vmapped update)"""
    batched_updates: int = 10
    """timed batched updates per size"""
    batched_modes: tuple[Literal["eager", "cuda-graph"], ...] = ("eager", "cuda-graph")
    """update modes of the batched sizes to time (cuda-graph only on CUDA)"""
    concurrent: bool = True
    """also time the concurrent updates (each run's own update, side by side) of each batched size"""
    eval_steps: int = 131_000
    """agent steps of one run's final evaluation (100 episodes) in the table's projection: the mean of
    this project's committed full-length DrQ(eps) runs (results/drq_eps_100k: 63k Kangaroo to 203k
    Freeway), more than the 100k steps of training"""


def time_vector_env_steps(game: str, steps: int, num_envs: int) -> float:
    """ale-py's C++ AtariVectorEnv, configured as close to the protocol as it goes."""
    from ale_py.vector_env import AtariVectorEnv

    env = AtariVectorEnv(
        re.sub(r"(?<!^)(?=[A-Z])", "_", game).lower(),  # UpNDown -> up_n_down, the ROM id
        num_envs,
        noop_max=1,  # its noops are raw frames; the protocol wants 0..29 agent steps
        use_fire_reset=False,
        reward_clipping=False,
        life_loss_info=True,
        stack_num=1,
    )
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps // num_envs):
        env.step(rng.integers(env.single_action_space.n, size=num_envs))
    elapsed = time.perf_counter() - start
    env.close()
    return elapsed / (steps // num_envs * num_envs)


def main(bench: BenchArgs) -> None:
    game = canonical_game(bench.env_id)
    device = resolve_device(bench.device)
    name = device_name(device)
    print(f"bench_drq: {game} on {device} ({name}), torch {torch.__version__}")

    env_time = time_env_steps(game, bench.env_steps)
    print(f"env steps/s alone (gymnasium + protocol wrapper): {1 / env_time:8.1f}")
    for num_envs in (1, 2):
        vec_time = time_vector_env_steps(game, bench.env_steps, num_envs)
        print(f"env steps/s alone (ale-py AtariVectorEnv, {num_envs} env): {1 / vec_time:8.1f}  (not used, see README)")

    args = replace_flags(drq.Args(), env_id=game, device=bench.device)
    num_actions = int(make_atari100k_env(game, seed=0).action_space.n)
    update_time = drq_update_seconds(drq, args, device, num_actions, bench.updates)
    print(f"updates/s alone (batch {args.batch_size}, eager):       {1 / update_time:8.1f}  "
          f"({update_time * 1e3:.2f} ms)")  # fmt: skip
    if graph_capture_available(device):
        graph_time = drq_update_seconds(drq, args, device, num_actions, bench.updates, graph=True)
        print(f"updates/s alone (batch {args.batch_size}, CUDA graph):  {1 / graph_time:8.1f}  "
              f"({graph_time * 1e3:.2f} ms, {update_time / graph_time:.2f}x eager)")  # fmt: skip
        update_time = graph_time  # what the loop uses on CUDA by default
    processes = os.cpu_count() or 1
    worker_time = time_worker_env_steps(game, 8, processes, bench.env_steps // 8)
    print(
        f"env steps/s of 8 runs' environments in {processes} worker processes (--env-workers): {1 / worker_time:8.1f}"
    )
    modes = [m for m in bench.batched_modes if m == "eager" or graph_capture_available(device)]
    for runs in bench.batched:
        worker_time = time_worker_env_steps(game, runs, min(processes, runs), max(bench.env_steps // runs, 50))
        print(f"env steps/s of {runs} runs' environments in {min(processes, runs)} worker processes: "
              f"{1 / worker_time:8.1f}")  # fmt: skip
        # The table's final evaluations step 130 runs' environments for eval_steps each (the acting
        # forwards, one per lockstep step of a batch, not counted): a floor whatever the update costs.
        eval_hours = 130 * bench.eval_steps * worker_time / 3600
        print(f"  the table's final evaluations (130 x {bench.eval_steps:,} agent steps) at this rate: at least "
              f"{eval_hours:.2f} h, on top of the training hours below")  # fmt: skip
        for mode in modes:
            seconds = drq_batched_update_seconds(drq, args, device, num_actions, runs, bench.batched_updates,
                                                 graph=mode == "cuda-graph")  # fmt: skip
            # the environments of a batch step in the worker processes (--env-workers = the cores) while
            # the GPU runs the queued update: a step costs about the larger of the two, at most their sum
            env = runs * worker_time
            hours = [-(-130 // runs) * 100_000 * t / 3600 for t in (max(env, seconds), env + seconds)]
            print(
                f"batched update ({mode}), {runs:3d} runs: {runs / seconds:8.1f} run-updates/s "
                f"({seconds * 1e3:7.1f} ms each); 26 x 5 table in batches of {runs}: {hours[0]:.2f} h "
                f"(env and update overlapped) to {hours[1]:.2f} h (one after the other)"
            )
            if not bench.concurrent:
                continue
            seconds = drq_concurrent_update_seconds(drq, args, device, num_actions, runs, bench.batched_updates,
                                                    graph=mode == "cuda-graph")  # fmt: skip
            hours = [-(-130 // runs) * 100_000 * t / 3600 for t in (max(env, seconds), env + seconds)]
            print(
                f"concurrent updates ({mode}), {runs:3d} runs: {runs / seconds:8.1f} run-updates/s "
                f"({seconds * 1e3:7.1f} ms per round); 26 x 5 table in batches of {runs}: {hours[0]:.2f} h "
                f"(env and update overlapped) to {hours[1]:.2f} h (one after the other)"
            )

    with tempfile.TemporaryDirectory() as tmp:
        full_args = replace_flags(
            args,
            total_steps=bench.full_steps,
            learning_starts=bench.learning_starts,
            epsilon_decay_steps=0,  # act greedily (eps 0.01) right after warm-up, as in most of a run
            eval_episodes=0,
            output_dir=str(Path(tmp) / "run"),
        )
        results = drq.main(full_args)
    full_time = results["train_time_s"]
    num_updates = bench.full_steps - bench.learning_starts + 1
    ideal_time = bench.full_steps * env_time + num_updates * update_time
    print(f"full loop steps/s ({num_updates}/{bench.full_steps} steps update): {bench.full_steps / full_time:8.1f}")
    print(f"ideal steps/s = 1 / (env + update time per step):  {bench.full_steps / ideal_time:8.1f}")
    print(f"ratio full / ideal: {ideal_time / full_time:.3f}  (goal >= 0.85)")
    projected = 100_000 * full_time / bench.full_steps
    print(
        f"projected 100k-step run at this loop's rate: {projected / 60:.1f} min (plus evaluation); "
        f"the DrQ(eps) table, 26 games x 5 seeds one after another: {130 * projected / 3600:.1f} h"
    )
    print(f"update mode of the loop: {results['update_mode']}")


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
