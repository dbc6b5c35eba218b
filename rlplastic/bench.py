"""Timing helpers shared by the bench scripts (scripts/bench_*.py): what one env step or one update
costs on the current device. The scripts load the agents with rlplastic.sweep.load_agent, as the
tests and sweeps do."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from types import ModuleType

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlplastic.batched import StackedModules
from rlplastic.cuda_graphs import CapturedStep, ConcurrentSteps
from rlplastic.envs.atari import make_atari100k_env
from rlplastic.machine import device_generator
from rlplastic.replay import FrameReplay, StackedFrameReplays

# Operators that allocate or re-label memory, or mark a profiler range, without launching a kernel.
_FREE_OPS = {"empty", "empty_strided", "detach", "lift_fresh", "alias", "set_",
             "_record_function_enter_new", "_record_function_exit"}  # fmt: skip


class DeviceOpCounter(TorchDispatchMode):
    """Counts the tensor operators a block of code runs (views and bare allocations left out): on a
    GPU each is a kernel launch, or a node of a captured graph, so the count is a device-free
    measure of a step's launch overhead.

        with DeviceOpCounter() as ops:
            update()
        ops.total, ops.counts.most_common(5)
    """

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _FREE_OPS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"


def time_env_steps(game: str, steps: int) -> float:
    """Seconds per random-action step of the Atari-100k environment."""
    env = make_atari100k_env(game, seed=0)
    rng = np.random.default_rng(0)
    env.reset()
    start = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
        if terminated or truncated:
            env.reset()
    return (time.perf_counter() - start) / steps


def random_replay(replay: FrameReplay, num_actions: int, steps: int = 2_000) -> FrameReplay:
    """Fill `replay` with random frames and flags: timing needs its shapes, not its contents."""
    rng = np.random.default_rng(0)
    for _ in range(steps):
        frame = rng.integers(0, 255, (84, 84), dtype=np.uint8)
        action, reward, terminal = int(rng.integers(num_actions)), float(rng.random() < 0.1), rng.random() < 0.01
        replay.add(frame, action, reward, bool(terminal), False)
    return replay


def time_steps(step: Callable[[], torch.Tensor], count: int, device: torch.device, warmup: int = 5) -> float:
    """Seconds per call of `step` (which returns a tensor, e.g. the loss), after `warmup` calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        out = step()
    out.item()  # wait for the queued kernels
    return (time.perf_counter() - start) / count


def drq_update_seconds(drq: ModuleType, args, device: torch.device, num_actions: int, updates: int,
                       graph: bool = False) -> float:  # fmt: skip
    """Seconds per DrQ update (the agent module `drq`, with `args`) on a filled replay; graph=True:
    the same update captured once in a CUDA graph and replayed."""
    generator = device_generator(device, 0)
    replay = FrameReplay(args.buffer_size, args.n_step, args.gamma, device=device, generator=generator)
    random_replay(replay, num_actions)
    learner = drq.build_learner(replace(args, cuda_graph=graph), num_actions, device)
    step = lambda: drq.update(args, *learner, replay, generator)["td_loss"]  # noqa: E731
    if graph:
        step = CapturedStep(step, generators=[generator])
    return time_steps(step, updates, device)  # graph: 3 eager steps, the capture, then replays


def drq_batched_update_seconds(drq: ModuleType, args, device: torch.device, num_actions: int, runs: int,
                               updates: int, graph: bool = False) -> float:  # fmt: skip
    """Seconds per batched DrQ update of `runs` runs in one stack (agents/drq_batched.py: one vmapped
    forward and backward, each run's own optimizer step); graph=True: captured in one CUDA graph.
    Each run samples from its own small replay of random frames (rlplastic.replay.StackedFrameReplays,
    as in a batch): timing needs the shapes, not 100k-step replays."""
    from rlplastic.agent_files import load_script

    many = load_script("drq_batched")  # the many-runs machinery beside agents/drq.py
    nets = [drq.QNetwork(num_actions).to(device) for _ in range(runs)]
    stack = StackedModules(nets)
    learners = [drq.build_learner(replace(args, cuda_graph=graph), num_actions, device, q) for q in nets]
    targets = StackedModules([target for _, target, _ in learners]) if args.interventions.ema > 0 else None
    generators = [device_generator(device, i) for i in range(runs)]
    replays = StackedFrameReplays(runs, 1_000, args.n_step, args.gamma, device=device, generators=generators)
    for replay in replays.replays:
        random_replay(replay, num_actions, steps=1_000)
    optimizers, valid = [optimizer for _, _, optimizer in learners], many.action_mask(stack)

    def step() -> torch.Tensor:
        losses = many.batched_update(args, stack, targets, optimizers, replays, generators, valid)
        return losses["td_loss"].sum()

    if graph:
        step = CapturedStep(step, generators=generators)
    return time_steps(step, updates, device, warmup=4 if graph else 2)


def drq_concurrent_update_seconds(drq: ModuleType, args, device: torch.device, num_actions: int, runs: int,
                                  updates: int, graph: bool = False) -> float:  # fmt: skip
    """Seconds per round of `runs` DrQ updates, each run's own (agents/drq.py --batched-update
    concurrent): graph=True captures each in its own CUDA graph and replays them side by side on a
    pool of streams (rlplastic.cuda_graphs.ConcurrentSteps). Each run has a small replay of random
    frames and its own generator, as in a batch."""
    generators = [device_generator(device, i) for i in range(runs)]
    replays = [random_replay(FrameReplay(1_000, args.n_step, args.gamma, device=device, generator=g), num_actions,
                             steps=1_000) for g in generators]  # fmt: skip
    learners = [drq.build_learner(replace(args, cuda_graph=graph), num_actions, device) for _ in range(runs)]
    steps = [lambda i=i: drq.update(args, *learners[i], replays[i], generators[i]) for i in range(runs)]
    concurrent = ConcurrentSteps(steps, generators, capture=graph)

    def step() -> torch.Tensor:
        concurrent()
        return learners[0][0].value.bias.sum()  # on the main stream, after every run's update

    return time_steps(step, updates, device, warmup=4 if graph else 2)


def time_worker_env_steps(game: str, runs: int, processes: int, steps: int) -> float:
    """Seconds per env step (per environment) when `runs` environments step together in
    `processes` worker processes (rlplastic.env_workers), random actions."""
    from rlplastic.env_workers import EnvWorkers

    workers = EnvWorkers([(game, seed) for seed in range(runs)], processes, max_episode_steps=27_000)
    rng = np.random.default_rng(0)
    num_actions = workers.env(0).action_space.n
    workers.step_all([0] * runs)  # warm
    start = time.perf_counter()
    for _ in range(steps):
        workers.step_all([int(a) for a in rng.integers(num_actions, size=runs)])
    elapsed = time.perf_counter() - start
    workers.close()
    return elapsed / (steps * runs)
