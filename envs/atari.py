"""The Atari-100k environment protocol (dopamine / BBF convention, SPEC section 1).

    env = make_atari100k_env("Pong", seed=0)
    obs, info = env.reset()                     # (4, 84, 84) uint8
    obs, reward, terminated, truncated, info = env.step(action)

`reward` is the raw game reward: clip it for learning, never for the logged return.
`info["life_loss"]` is True when a life was lost but the game goes on: a terminal for learning
(no bootstrap across it, and the frame stack restarts from zeros), not the end of the episode.
`info["episode"]` = {"r": raw return, "l": agent steps} appears on the step that ends an episode.

Why not ale-py's AtariVectorEnv: it is no faster for the single environment DrQ and BBF step
(measured in scripts/bench_drq.py), its noop starts are 1..30 raw frames rather than 0..29 agent
steps, and it keeps the frame stack across a life loss. The gymnasium path below does the protocol
exactly.
"""

from __future__ import annotations

import pickle
from typing import Any

import ale_py
import gymnasium as gym
import numpy as np
from gymnasium.wrappers import AtariPreprocessing

gym.register_envs(ale_py)

ATARI100K_GAMES: tuple[str, ...] = (
    "Alien", "Amidar", "Assault", "Asterix", "BankHeist", "BattleZone", "Boxing", "Breakout",
    "ChopperCommand", "CrazyClimber", "DemonAttack", "Freeway", "Frostbite", "Gopher", "Hero",
    "Jamesbond", "Kangaroo", "Krull", "KungFuMaster", "MsPacman", "Pong", "PrivateEye", "Qbert",
    "RoadRunner", "Seaquest", "UpNDown",
)  # fmt: skip

FRAME_SKIP = 4
FRAME_SIZE = 84
STACK = 4
NOOP_MAX = 30  # noop starts draw 0..NOOP_MAX-1 agent steps
MAX_EPISODE_STEPS = 27_000  # 108k frames


def canonical_game(game: str) -> str:
    """'Pong', 'pong', 'ALE/Pong-v5' -> 'Pong'; anything outside the 26 games is a ValueError."""
    name = game.strip()
    if name.startswith("ALE/"):
        name = name[len("ALE/") :]
    if name.endswith("-v5"):
        name = name[: -len("-v5")]
    by_lower = {g.lower(): g for g in ATARI100K_GAMES}
    if name.lower() not in by_lower:
        raise ValueError(
            f"unknown Atari-100k game {game!r}; allowed: {', '.join(ATARI100K_GAMES)} "
            "(or their ALE ids such as ALE/Pong-v5)"
        )
    return by_lower[name.lower()]


class Atari100kProtocol(gym.Wrapper):
    """Noop starts, zero-filled frame stack, life-loss signal, episode cap and raw return.

    Sits on gymnasium's AtariPreprocessing (frame skip 4 with max-pool of the last two frames,
    grayscale, 84x84 INTER_AREA), which must be built with noop_max=0 and
    terminal_on_life_loss=False: its own noops count raw frames, and its life-loss terminal would
    make an autoreset restart the whole game.
    """

    def __init__(self, env: gym.Env, noop_max: int = NOOP_MAX, max_episode_steps: int = MAX_EPISODE_STEPS):
        super().__init__(env)
        self.noop_max = noop_max
        self.max_episode_steps = max_episode_steps
        self.observation_space = gym.spaces.Box(0, 255, (STACK, FRAME_SIZE, FRAME_SIZE), np.uint8)
        self._stack = np.zeros((STACK, FRAME_SIZE, FRAME_SIZE), np.uint8)
        self._lives = 0
        self._steps = 0
        self._return = 0.0

    def _restart_stack(self, frame: np.ndarray) -> np.ndarray:
        self._stack[:-1] = 0
        self._stack[-1] = frame
        return self._stack.copy()

    def _push(self, frame: np.ndarray) -> np.ndarray:
        self._stack[:-1] = self._stack[1:]
        self._stack[-1] = frame
        return self._stack.copy()

    def get_state(self) -> dict[str, Any]:
        """Everything needed to continue this episode bit-identically (for resumable runs)."""
        preprocessing = self.env
        return {
            "ale": pickle.dumps(self.env.unwrapped.ale.cloneState(include_rng=True)),
            "np_random": self.env.unwrapped.np_random.bit_generator.state,
            "action_space": self.action_space.np_random.bit_generator.state,
            "obs_buffer": [b.copy() for b in preprocessing.obs_buffer],
            "preprocessing_lives": preprocessing.lives,
            "game_over": preprocessing.game_over,
            "stack": self._stack.copy(),
            "lives": self._lives,
            "steps": self._steps,
            "return": self._return,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        preprocessing = self.env
        self.env.unwrapped.ale.restoreState(pickle.loads(state["ale"]))
        self.env.unwrapped.np_random.bit_generator.state = state["np_random"]
        self.action_space.np_random.bit_generator.state = state["action_space"]
        for buffer, saved in zip(preprocessing.obs_buffer, state["obs_buffer"], strict=True):
            buffer[...] = saved
        preprocessing.lives, preprocessing.game_over = state["preprocessing_lives"], state["game_over"]
        self._stack[...] = state["stack"]
        self._lives, self._steps, self._return = state["lives"], state["steps"], state["return"]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        frame, info = self.env.reset(seed=seed, options=options)
        self._steps, self._return = 0, 0.0
        noops = int(self.env.unwrapped.np_random.integers(0, self.noop_max)) if self.noop_max > 0 else 0
        for _ in range(noops):
            frame, reward, terminated, truncated, info = self.env.step(0)
            self._steps += 1
            self._return += float(reward)
            if terminated or truncated:  # never seen in 30 noops, but keep the protocol if it happens
                frame, info = self.env.reset()
                self._steps, self._return = 0, 0.0
        self._lives = self.env.unwrapped.ale.lives()
        info = dict(info, noops=noops, life_loss=False)
        return self._restart_stack(frame), info

    def step(self, action):
        frame, reward, terminated, truncated, info = self.env.step(action)
        self._steps += 1
        self._return += float(reward)
        lives = info["lives"]
        life_loss = bool(lives < self._lives) and not terminated
        self._lives = lives
        truncated = truncated or self._steps >= self.max_episode_steps
        obs = self._restart_stack(frame) if life_loss else self._push(frame)
        info = dict(info, life_loss=life_loss)
        if terminated or truncated:
            info["episode"] = {"r": self._return, "l": self._steps}
        return obs, float(reward), bool(terminated), bool(truncated), info


def make_atari100k_env(
    game: str,
    seed: int,
    *,
    noop_max: int = NOOP_MAX,
    max_episode_steps: int = MAX_EPISODE_STEPS,
) -> Atari100kProtocol:
    """One Atari-100k environment, seeded. Rewards are raw; clip them for learning only."""
    name = canonical_game(game)
    env = gym.make(
        f"ALE/{name}-v5",
        frameskip=1,  # v5 defaults to 4 internal skips without max-pool
        repeat_action_probability=0.0,  # v5 defaults to sticky actions 0.25
        full_action_space=False,
        max_num_frames_per_episode=max_episode_steps * FRAME_SKIP,
        # AtariPreprocessing reads the screen itself; ALE's own per-frame observation is thrown
        # away, and grayscale is the cheapest one (same pixels out, ~9% faster).
        obs_type="grayscale",
        disable_env_checker=True,
    )
    env = AtariPreprocessing(
        env,
        noop_max=0,
        frame_skip=FRAME_SKIP,
        screen_size=FRAME_SIZE,
        terminal_on_life_loss=False,
        grayscale_obs=True,
    )
    env = Atari100kProtocol(env, noop_max=noop_max, max_episode_steps=max_episode_steps)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


def clip_reward(reward: float) -> float:
    """The learning reward: the raw reward clipped to [-1, 1]."""
    return max(-1.0, min(1.0, reward))
