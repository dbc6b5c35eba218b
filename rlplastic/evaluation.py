"""Final evaluation: epsilon-greedy episodes on several environments in lockstep."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np


@dataclass
class EvalResult:
    returns: list[float] = field(default_factory=list)  # raw, unclipped episode returns
    lengths: list[int] = field(default_factory=list)  # agent steps, noop starts included

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.returns)) if self.returns else None


def evaluate_episodes(
    make_env: Callable[[int], gym.Env],
    greedy_actions: Callable[[np.ndarray], np.ndarray],
    num_episodes: int,
    num_envs: int,
    epsilon: float,
    seed: int,
) -> EvalResult:
    """Play `num_episodes` whole episodes and return them in a fixed order (env, then episode).

    Each environment gets its share of episodes up front. Stopping when the first N episodes
    finish would over-represent short episodes, a bias of parallel evaluation loops.
    greedy_actions maps a (n, *obs_shape) batch of observations to n greedy actions.
    """
    result = EvalResult()
    if num_episodes <= 0:
        return result
    num_envs = max(1, min(num_envs, num_episodes))
    quota = [num_episodes // num_envs + (i < num_episodes % num_envs) for i in range(num_envs)]
    envs = [make_env(seed + i) for i in range(num_envs)]
    rng = np.random.default_rng(seed)
    per_env: list[list[dict]] = [[] for _ in envs]
    obs = [env.reset()[0] for env in envs]
    running = [i for i in range(num_envs) if quota[i] > 0]
    while running:
        actions = greedy_actions(np.stack([obs[i] for i in running]))
        explore = rng.random(len(running)) < epsilon
        for j, i in enumerate(running):
            action = int(envs[i].action_space.sample()) if explore[j] else int(actions[j])
            obs[i], _, terminated, truncated, info = envs[i].step(action)
            if terminated or truncated:
                per_env[i].append(info["episode"])
                if len(per_env[i]) < quota[i]:
                    obs[i] = envs[i].reset()[0]
        running = [i for i in running if len(per_env[i]) < quota[i]]
    for env in envs:
        env.close()
    for episodes in per_env:
        result.returns.extend(float(e["r"]) for e in episodes)
        result.lengths.extend(int(e["l"]) for e in episodes)
    return result
