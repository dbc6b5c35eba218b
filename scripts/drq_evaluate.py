"""Evaluate a DrQ network saved by `agents/drq.py --save-model` again, e.g. at another epsilon.

    python scripts/drq_evaluate.py runs/Kangaroo__drq__1/q_network.pt --env-id Kangaroo --epsilon 0.01

Plays --episodes whole Atari-100k episodes (the same protocol and lockstep evaluation as the
agent's final evaluation) and prints the mean, the spread and each return.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import tyro
from rlplastic.envs.atari import MAX_EPISODE_STEPS, canonical_game, make_atari100k_env

from rlplastic.agent_files import load_agent
from rlplastic.evaluation import evaluate_episodes
from rlplastic.files import read_failure, safe_torch_load
from rlplastic.machine import resolve_device


@dataclass
class EvalArgs:
    model: tyro.conf.Positional[str]
    """q_network.pt written by agents/drq.py --save-model"""
    env_id: str = "Pong"
    """the game the network was trained on"""
    epsilon: float = 0.001
    """exploration rate of the evaluation (DrQ(eps): 0.001)"""
    episodes: int = 100
    """whole episodes to play"""
    envs: int = 8
    """environments stepped in lockstep"""
    seed: int = 10_001
    """seed of the evaluation environments (the agent's final evaluation uses its seed + 10,000)"""
    max_episode_steps: int = MAX_EPISODE_STEPS
    """cap on an episode's agent steps"""
    noop_unit: Literal["agent-steps", "frames"] = "agent-steps"
    """the 0..29 noops starting each episode: agent steps (dopamine's runner since 2023, the runs'
    default) or single frames (its 2021 runner)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where the network runs"""


def main(args: EvalArgs) -> dict:
    drq = load_agent("drq")
    try:
        game = canonical_game(args.env_id)
        device = resolve_device(args.device)
        if not 0 <= args.epsilon <= 1 or args.episodes <= 0 or args.envs <= 0:
            raise ValueError(f"--epsilon {args.epsilon} / --episodes {args.episodes} / --envs {args.envs}: "
                             "need epsilon in [0, 1] and positive counts")  # fmt: skip
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"drq_evaluate: {e}")
    try:
        weights = safe_torch_load(args.model)
    except Exception as e:  # any reading failure is the file's fault: name it (plain data only, never code)
        sys.exit(f"drq_evaluate: {args.model} is not a saved DrQ network ({read_failure(e)})")
    num_actions = int(make_atari100k_env(game, 0).action_space.n)
    q_network = drq.QNetwork(num_actions).to(device)
    try:
        q_network.load_state_dict(weights)
    except (RuntimeError, TypeError) as e:
        sys.exit(f"drq_evaluate: {args.model} is not a DrQ network for {game} ({num_actions} actions): {e}")
    q_network.eval()

    def greedy_actions(observations: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return q_network(torch.as_tensor(observations, device=device)).argmax(1).cpu().numpy()

    # the runs' own evaluation, with this script's epsilon, environments and episode cap
    make_env = lambda seed: make_atari100k_env(  # noqa: E731
        game, seed, max_episode_steps=args.max_episode_steps, noop_unit=args.noop_unit
    )
    result = evaluate_episodes(make_env, greedy_actions, args.episodes, args.envs, args.epsilon, args.seed)
    returns = np.array(result.returns)
    print(f"drq_evaluate: {game} epsilon {args.epsilon}, noops in {args.noop_unit}: "
          f"mean {returns.mean():.2f} (std {returns.std():.2f}) "
          f"over {len(returns)} episodes, mean length {np.mean(result.lengths):.0f}")  # fmt: skip
    print("returns:", " ".join(f"{r:g}" for r in returns))
    return {"mean": float(returns.mean()), "returns": result.returns, "lengths": result.lengths}


if __name__ == "__main__":
    main(tyro.cli(EvalArgs))
