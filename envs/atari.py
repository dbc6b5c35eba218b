"""The Atari-100k environment protocol, as dopamine's Atari-100k runner plays it.

    env = make_atari100k_env("Pong", seed=0)
    obs, info = env.reset()                     # (4, 84, 84) uint8
    obs, reward, terminated, truncated, info = env.step(action)

`reward` is the raw game reward: clip it for learning, never for the logged return.
`info["life_loss"]` is True when a life was lost but the game goes on: a terminal for learning
(no bootstrap across it, and the frame stack restarts from zeros), not the end of the episode.
`info["episode"]` = {"r": raw return, "l": agent steps} appears on the step that ends an episode.

Sources: google/dopamine `discrete_domains/atari_lib.py` (AtariPreprocessing, with
`terminal_on_life_loss = True` as `labs/atari_100k/configs/DrQ_eps.gin` sets it) and
`labs/atari_100k/atari_100k_runner.py` (noop starts, episode return and length, the 27k cap);
Agarwal et al. 2021 (100 evaluation episodes, 27k-step cap). What the frame loop does, exactly:

- frame skip 4: the action is repeated for up to 4 emulator frames and the rewards summed; the
  last two frames are read in grayscale and max-pooled, then resized to 84x84 (INTER_AREA);
- the frame loop stops early at the frame where a life is lost or the game ends (the reference's
  terminal-on-life-loss preprocessing breaks there), so the rest of the skip is not played; the
  pooled image then mixes whatever screens were read (the reference warns that this observation
  "may not contain valid image data"; it is the first frame of a fresh stack, as there);
- noop starts: 0..29 noop agent steps at each episode start. As in the runner, they count
  neither in the episode's length, its return, the 27k cap, nor the run's step budget, and a
  terminal during them (a life lost, or game over) restarts the game;
- or, with `noop_unit="frames"`, the noop starts of dopamine's 2021 Atari-100k runner
  (`labs/atari_100k/eval_run_experiment.py`, MaxEpisodeEvalRunner, from its commit "Correctly
  implement no-ops" of 2021-08-24 until the runner above replaced it in 2023; the runner that
  DrQ_eps.gin of 2021-09-08 configures, so presumably the one behind the 100 DrQ(ε) runs per game
  Agarwal et al. 2021 released): 0..29 single emulator frames of NOOP straight on the ALE, the
  wrapper's screens and lives untouched, so the first observation is the reset screen, as there;
  only a game over during them restarts the game. Those starts fall on every frame offset, not only
  on multiples of the frame skip, which may give a near-greedy evaluation more varied episodes;
- an episode ends at game over or after 27,000 counted agent steps.

Why not ale-py's AtariVectorEnv: its noop starts are 1..30 raw frames rather than 0..29 agent
steps, it keeps the frame stack across a life loss, and it does not stop a frame skip at a life
loss. The loop below plays the protocol exactly on ALE directly.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import ale_py
import cv2
import gymnasium as gym
import numpy as np

from rlplastic.safe_pickle import restricted_load

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
NOOP_MAX = 30  # noop starts draw 0..NOOP_MAX-1 agent steps (or frames, noop_unit="frames")
NOOP_UNITS = ("agent-steps", "frames")
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
    """Frame skip with max-pool, noop starts, zero-filled frame stack, life-loss signal, episode cap
    and raw return, on an `ALE/<Game>-v5` env built with frameskip=1 (it plays the ALE directly)."""

    def __init__(
        self,
        env: gym.Env,
        noop_max: int = NOOP_MAX,
        max_episode_steps: int = MAX_EPISODE_STEPS,
        noop_unit: str = "agent-steps",
    ):
        super().__init__(env)
        if noop_unit not in NOOP_UNITS:
            raise ValueError(f"noop unit {noop_unit!r}: allowed {', '.join(NOOP_UNITS)}")
        self.noop_max = noop_max
        self.noop_unit = noop_unit
        self.max_episode_steps = max_episode_steps
        self.observation_space = gym.spaces.Box(0, 255, (STACK, FRAME_SIZE, FRAME_SIZE), np.uint8)
        self.ale = env.unwrapped.ale
        self._actions = env.unwrapped._action_set  # minimal action set; index 0 is NOOP
        height, width = self.ale.getScreenDims()
        self._screens = np.zeros((2, height, width), np.uint8)  # the last two frames of a skip
        self._stack = np.zeros((STACK, FRAME_SIZE, FRAME_SIZE), np.uint8)
        self._lives = 0
        self._steps = 0
        self._return = 0.0

    # The frame loop
    def _pool_and_resize(self) -> np.ndarray:
        # In place into the first screen, as the reference does: a skip cut short before its third
        # frame pools with the previous step's pooled image.
        np.maximum(self._screens[0], self._screens[1], out=self._screens[0])
        return cv2.resize(self._screens[0], (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_AREA)

    def _skip(self, action: int) -> tuple[np.ndarray, float, bool, bool]:
        """One agent step: (frame, summed raw reward, game over, life lost)."""
        reward, game_over, life_lost = 0.0, False, False
        for t in range(FRAME_SKIP):
            reward += self.ale.act(self._actions[action])
            game_over = self.ale.game_over(with_truncation=False)
            lives = self.ale.lives()
            life_lost = lives < self._lives
            self._lives = lives
            if t >= FRAME_SKIP - 2:
                self.ale.getScreenGrayscale(self._screens[t - (FRAME_SKIP - 2)])
            if game_over or life_lost:
                break
        return self._pool_and_resize(), reward, game_over, life_lost and not game_over

    def _new_game(self, seed: int | None = None, options: dict[str, Any] | None = None) -> np.ndarray:
        self.env.reset(seed=seed, options=options)
        self._lives = self.ale.lives()
        self.ale.getScreenGrayscale(self._screens[0])
        self._screens[1].fill(0)
        return self._pool_and_resize()

    # Frame stack
    def _restart_stack(self, frame: np.ndarray) -> np.ndarray:
        self._stack[:-1] = 0
        self._stack[-1] = frame
        return self._stack.copy()

    def _push(self, frame: np.ndarray) -> np.ndarray:
        self._stack[:-1] = self._stack[1:]
        self._stack[-1] = frame
        return self._stack.copy()

    # gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        frame = self._new_game(seed, options)
        noops = int(self.env.unwrapped.np_random.integers(0, self.noop_max)) if self.noop_max > 0 else 0
        # not counted: the runner plays the noops outside the episode's counters
        if self.noop_unit == "frames":  # the 2021 runner: raw frames; the observation stays the reset screen
            for _ in range(noops):
                self.ale.act(self._actions[0])
            if self.ale.game_over(with_truncation=False):
                frame = self._new_game()
        else:
            for _ in range(noops):
                frame, _, game_over, life_lost = self._skip(0)
                if game_over or life_lost:  # a terminal during the noops restarts the game, as there
                    frame = self._new_game()
        self._steps, self._return = 0, 0.0
        return self._restart_stack(frame), {"noops": noops, "lives": self._lives, "life_loss": False}

    def step(self, action):
        frame, reward, terminated, life_loss = self._skip(int(action))
        self._steps += 1
        self._return += reward
        truncated = self._steps >= self.max_episode_steps and not terminated
        obs = self._restart_stack(frame) if life_loss else self._push(frame)
        info: dict[str, Any] = {"lives": self._lives, "life_loss": life_loss}
        if terminated or truncated:
            info["episode"] = {"r": self._return, "l": self._steps}
        return obs, float(reward), bool(terminated), bool(truncated), info

    # Resumable runs
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this episode bit-identically (for resumable runs)."""
        return {
            "ale": np.frombuffer(pickle.dumps(self.ale.cloneState(include_rng=True)), np.uint8).copy(),
            "np_random": self.env.unwrapped.np_random.bit_generator.state,
            "action_space": self.action_space.np_random.bit_generator.state,
            "screens": self._screens.copy(),
            "stack": self._stack.copy(),
            "lives": self._lives,
            "steps": self._steps,
            "return": self._return,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ale.restoreState(_ale_state(state["ale"]))
        self.env.unwrapped.np_random.bit_generator.state = state["np_random"]
        self.action_space.np_random.bit_generator.state = state["action_space"]
        self._screens[...] = state["screens"]
        self._stack[...] = state["stack"]
        self._lives, self._steps, self._return = state["lives"], state["steps"], state["return"]


def _ale_state(saved: np.ndarray) -> ale_py.ALEState:
    """An ALEState back from its bytes; the bytes must unpickle to an ALEState and nothing else."""
    state = restricted_load(
        io.BytesIO(np.asarray(saved, np.uint8).tobytes()),
        lambda module, name: name == "ALEState" and module.startswith("ale_py"),
        "a saved emulator state",
    )
    if not isinstance(state, ale_py.ALEState):
        raise ValueError(f"saved emulator state is a {type(state).__name__}, not an ALEState")
    return state


def make_atari100k_env(
    game: str,
    seed: int,
    *,
    noop_max: int = NOOP_MAX,
    max_episode_steps: int = MAX_EPISODE_STEPS,
    noop_unit: str = "agent-steps",
) -> Atari100kProtocol:
    """One Atari-100k environment, seeded. Rewards are raw; clip them for learning only. `noop_unit`:
    "agent-steps" (dopamine's runner since 2023, the default) or "frames" (its 2021 runner)."""
    name = canonical_game(game)
    env = gym.make(
        f"ALE/{name}-v5",
        frameskip=1,  # the protocol's own frame loop skips; v5 defaults to 4 without max-pool
        repeat_action_probability=0.0,  # v5 defaults to sticky actions 0.25
        full_action_space=False,
        # ALE's own cap must never bind before the protocol's (noop frames are not counted there)
        max_num_frames_per_episode=(max_episode_steps + noop_max) * FRAME_SKIP,
        obs_type="grayscale",  # the cheapest observation; the protocol reads the screen itself
        disable_env_checker=True,
    )
    env = Atari100kProtocol(env, noop_max=noop_max, max_episode_steps=max_episode_steps, noop_unit=noop_unit)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


def clip_reward(reward: float) -> float:
    """The learning reward: the raw reward clipped to [-1, 1]."""
    return max(-1.0, min(1.0, reward))


SAMPLE = -1  # an action that tells the environment to draw from its own action space (exploration)


def step_env(env: gym.Env, action: int | None) -> tuple | None:
    """One step (None: none; SAMPLE: a draw from the env's own action space); an ended episode is
    followed by the next one's first observation, its info kept."""
    if action is None:
        return None
    obs, reward, terminated, truncated, info = env.step(int(env.action_space.sample()) if action == SAMPLE else action)
    if terminated or truncated:
        obs, _ = env.reset()
    return obs, reward, terminated, truncated, info
