"""The Atari-100k protocol on real ROMs (ale-py ships them)."""

import numpy as np
import pytest
from rlplastic.envs.atari import ATARI100K_GAMES, canonical_game, clip_reward, make_atari100k_env


def base_ale(env):
    return env.unwrapped.ale


def test_26_games_and_their_aliases_resolve():
    assert len(ATARI100K_GAMES) == 26
    assert canonical_game("Pong") == "Pong"
    assert canonical_game("mspacman") == "MsPacman"
    assert canonical_game("ALE/MsPacman-v5") == "MsPacman"


def test_unknown_game_error_names_value_and_choices():
    with pytest.raises(ValueError, match="'Tetris'.*Alien.*UpNDown"):
        canonical_game("Tetris")


def test_every_game_builds_with_the_minimal_action_set():
    for game in ATARI100K_GAMES:
        env = make_atari100k_env(game, seed=0)
        assert env.action_space.n == len(env.unwrapped.get_action_meanings()) <= 18
        env.close()


def test_sticky_actions_off_and_frame_skip_done_by_the_wrapper():
    env = make_atari100k_env("Pong", seed=0)
    assert base_ale(env).getFloat("repeat_action_probability") == 0.0
    assert env.unwrapped._frameskip == 1  # ALE itself steps single frames
    before = base_ale(env).getEpisodeFrameNumber()
    env.step(0)
    assert base_ale(env).getEpisodeFrameNumber() - before == 4  # 4 frames per agent step


def test_observation_is_a_zero_filled_stack_of_84x84_grayscale():
    env = make_atari100k_env("Breakout", seed=0)
    obs, info = env.reset()
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    assert not obs[:3].any() and obs[3].any()
    next_obs, *_ = env.step(1)
    assert np.array_equal(next_obs[2], obs[3]) and not next_obs[:2].any()


def test_noop_starts_take_0_to_29_agent_steps():
    env = make_atari100k_env("Pong", seed=3)
    counts = []
    for _ in range(40):
        _, info = env.reset()
        counts.append(info["noops"])
        assert base_ale(env).getEpisodeFrameNumber() == 4 * info["noops"]
    assert min(counts) >= 0 and max(counts) <= 29
    assert len(set(counts)) > 10


def test_life_loss_is_signalled_resets_the_stack_and_the_game_goes_on():
    env = make_atari100k_env("Breakout", seed=1)
    rng = np.random.default_rng(0)
    env.reset()
    lives = base_ale(env).lives()
    for _ in range(5000):
        frame_before = base_ale(env).getEpisodeFrameNumber()
        obs, reward, terminated, truncated, info = env.step(int(rng.integers(env.action_space.n)))
        if info["life_loss"]:
            break
    else:
        pytest.fail("random play lost no life in 5000 steps")
    assert not terminated and not truncated
    assert info["lives"] == lives - 1
    assert not obs[:3].any() and obs[3].any()  # zero-filled stack after a life loss
    obs, *_ = env.step(1)
    # The game was not reset: frames keep counting and lives stay lost.
    assert base_ale(env).getEpisodeFrameNumber() == frame_before + 8
    assert base_ale(env).lives() == lives - 1
    assert obs[2].any() and not obs[:2].any()


def test_logged_return_is_the_sum_of_raw_unclipped_rewards():
    env = make_atari100k_env("MsPacman", seed=0, max_episode_steps=400)
    rng = np.random.default_rng(0)
    env.reset()
    rewards = []
    while True:
        _, reward, terminated, truncated, info = env.step(int(rng.integers(env.action_space.n)))
        rewards.append(reward)
        if terminated or truncated:
            break
    assert max(rewards) >= 10  # MsPacman pellets are worth 10: the env does not clip
    assert info["episode"]["r"] == pytest.approx(sum(rewards))
    assert clip_reward(10.0) == 1.0 and clip_reward(-3.0) == -1.0 and clip_reward(0.0) == 0.0


def test_episode_cap_truncates_and_counts_noop_steps():
    env = make_atari100k_env("Pong", seed=0, max_episode_steps=50)
    _, info = env.reset()
    steps = info["noops"]
    while True:
        _, _, terminated, truncated, step_info = env.step(0)
        steps += 1
        if terminated or truncated:
            break
    assert truncated and not terminated and steps == 50 and step_info["episode"]["l"] == 50


def test_same_seed_same_trajectory():
    def rollout():
        env = make_atari100k_env("Breakout", seed=7)
        obs, _ = env.reset()
        out = [obs]
        for a in [1, 2, 3, 0] * 25:
            out.append(env.step(a)[0])
        return np.stack(out)

    assert np.array_equal(rollout(), rollout())
