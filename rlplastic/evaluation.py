"""Final evaluation: epsilon-greedy episodes on several environments in lockstep, for one run or
for the runs of one process at once (their environments then step in worker processes)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from rlplastic.envs.atari import SAMPLE, step_env


@dataclass
class EvalResult:
    returns: list[float] = field(default_factory=list)  # raw, unclipped episode returns
    lengths: list[int] = field(default_factory=list)  # agent steps after the noop starts (never counted)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.returns)) if self.returns else None


class LocalEnvs:
    """Environments in this process, with rlplastic.env_workers.EnvWorkers' step_all interface."""

    def __init__(self, envs: Sequence[gym.Env]):
        self.envs = list(envs)

    def env(self, index: int) -> gym.Env:
        return self.envs[index]

    def step_all(self, actions: Sequence[int | None]) -> list:
        return [step_env(env, action) for env, action in zip(self.envs, actions, strict=True)]

    def close(self) -> None:
        for env in self.envs:
            env.close()


def episode_quotas(num_episodes: int, num_envs: int) -> list[int]:
    """Each environment's share of the episodes, fixed up front."""
    num_envs = max(1, min(num_envs, num_episodes))
    return [num_episodes // num_envs + (i < num_episodes % num_envs) for i in range(num_envs)]


def evaluate_episodes(
    make_env: Callable[[int], gym.Env],
    greedy_actions: Callable[[np.ndarray], np.ndarray],
    num_episodes: int,
    num_envs: int,
    epsilon: float,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Play `num_episodes` whole episodes and return them in a fixed order (env, then episode).

    Each environment gets its share of episodes up front. Stopping when the first N episodes
    finish would over-represent short episodes, a bias of parallel evaluation loops.
    greedy_actions maps a (n, *obs_shape) batch of observations to n greedy actions; progress, if
    given, is called with (episodes done, num_episodes) as episodes end.
    """
    if num_episodes <= 0:
        return EvalResult()
    envs = LocalEnvs([make_env(seed + i) for i in range(len(episode_quotas(num_episodes, num_envs)))])
    try:
        return evaluate_runs(envs, [greedy_actions], num_episodes, num_envs, epsilon, [seed], progress)[0]
    finally:
        envs.close()


def evaluate_runs(
    envs: Any,
    acts: Sequence[Callable[[np.ndarray], np.ndarray]],
    num_episodes: int,
    num_envs: int,
    epsilon: float,
    seeds: Sequence[int],
    progress: Callable[[int, int], None] | None = None,
) -> list[EvalResult]:
    """evaluate_episodes for several runs at once: run r plays on environments r * E .. r * E + E - 1
    of `envs` (E = len(episode_quotas(num_episodes, num_envs)); built with seeds seeds[r] + i, as
    evaluate_episodes builds them), choosing with acts[r] and exploring with its own generator.
    `envs` steps them all at once (LocalEnvs, or EnvWorkers: the emulators of all runs on all
    cores). Each run's episodes are the ones it plays alone."""
    quota = episode_quotas(num_episodes, num_envs)
    per_run = len(quota)
    total = per_run * len(acts)
    obs = [envs.env(k).reset()[0] for k in range(total)]
    episodes: list[list[dict]] = [[] for _ in range(total)]
    rngs = [np.random.default_rng(seed) for seed in seeds]
    running = [[k for k in range(r * per_run, (r + 1) * per_run) if quota[k % per_run] > 0] for r in range(len(acts))]
    while any(running):
        actions: list[int | None] = [None] * total
        for r, live in enumerate(running):
            if not live:
                continue
            greedy = acts[r](np.stack([obs[k] for k in live]))
            explore = rngs[r].random(len(live)) < epsilon
            for j, k in enumerate(live):
                actions[k] = SAMPLE if explore[j] else int(greedy[j])
        for k, result in enumerate(envs.step_all(actions)):
            if result is None:
                continue
            obs[k], _, terminated, truncated, info = result
            if terminated or truncated:
                episodes[k].append(info["episode"])
                if progress is not None:  # all runs' episodes together
                    progress(sum(map(len, episodes)), num_episodes * len(acts))
        running = [[k for k in live if len(episodes[k]) < quota[k % per_run]] for live in running]
    results = []
    for r in range(len(acts)):
        result = EvalResult()
        for k in range(r * per_run, (r + 1) * per_run):
            result.returns.extend(float(e["r"]) for e in episodes[k])
            result.lengths.extend(int(e["l"]) for e in episodes[k])
        results.append(result)
    return results
