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


@pytest.mark.slow
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


def test_noop_starts_in_frames_as_dopamines_2021_runner():
    """noop_unit="frames": 0..29 single NOOP frames on the ALE, outside the episode's counters; the
    first observation stays the reset screen (the 2021 runner pooled the screens it already had)."""
    env = make_atari100k_env("Pong", seed=3, noop_unit="frames")
    reset_screen = make_atari100k_env("Pong", seed=3, noop_max=0).reset()[0]
    counts = []
    for _ in range(40):
        obs, info = env.reset()
        counts.append(info["noops"])
        assert base_ale(env).getEpisodeFrameNumber() == info["noops"]
        assert np.array_equal(obs, reset_screen)
    assert min(counts) >= 0 and max(counts) <= 29 and len({c % 4 for c in counts}) == 4  # every frame phase
    _, _, _, _, step_info = env.step(0)
    assert base_ale(env).getEpisodeFrameNumber() == counts[-1] + 4 and env._steps == 1
    with pytest.raises(ValueError, match="'steps'.*agent-steps, frames"):
        make_atari100k_env("Pong", seed=0, noop_unit="steps")


def test_life_loss_is_signalled_resets_the_stack_and_the_game_goes_on():
    env = make_atari100k_env("Breakout", seed=1)
    rng = np.random.default_rng(0)
    env.reset()
    lives = base_ale(env).lives()
    for _ in range(5000):
        obs, reward, terminated, truncated, info = env.step(int(rng.integers(env.action_space.n)))
        frame_before = base_ale(env).getEpisodeFrameNumber()
        if info["life_loss"]:
            break
    else:
        pytest.fail("random play lost no life in 5000 steps")
    assert not terminated and not truncated
    assert info["lives"] == lives - 1
    assert not obs[:3].any() and obs[3].any()  # zero-filled stack after a life loss
    obs, *_ = env.step(1)
    # The game was not reset: frames keep counting and lives stay lost.
    assert base_ale(env).getEpisodeFrameNumber() == frame_before + 4
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


def test_episode_cap_and_length_count_no_noop_steps():
    """dopamine's runner steps the noops outside its episode counters: the 27k cap, the length and
    the return count only the agent's own steps."""
    env = make_atari100k_env("Pong", seed=0, max_episode_steps=50)
    _, info = env.reset()
    while info["noops"] == 0:
        _, info = env.reset()
    steps = 0
    while True:
        _, _, terminated, truncated, step_info = env.step(0)
        steps += 1
        if terminated or truncated:
            break
    assert truncated and not terminated and steps == 50 and step_info["episode"]["l"] == 50
    assert base_ale(env).getEpisodeFrameNumber() == 4 * (50 + info["noops"])


def test_noop_rewards_are_not_in_the_return(monkeypatch):
    env = make_atari100k_env("Pong", seed=0, max_episode_steps=1)
    real_skip = env._skip
    monkeypatch.setattr(env, "_skip", lambda action: (lambda f, r, g, l: (f, r + 1.0, g, l))(*real_skip(action)))
    for _ in range(5):  # every emulator step now pays 1, noops included
        _, info = env.reset()
        _, reward, _, truncated, step_info = env.step(0)
        assert truncated and reward == 1.0 and step_info["episode"] == {"r": 1.0, "l": 1}
        if info["noops"] > 0:
            return
    pytest.fail("five resets without a noop")


def test_frame_skip_stops_at_the_frame_a_life_is_lost():
    """dopamine's preprocessing (terminal_on_life_loss) breaks out of the 4-frame skip at the frame
    where the lives counter drops, so the step plays fewer than 4 frames."""
    env = make_atari100k_env("Breakout", seed=1)
    rng = np.random.default_rng(0)
    env.reset()
    short_steps = 0
    ale = base_ale(env)
    for _ in range(3000):
        before, lives, saved = ale.getEpisodeFrameNumber(), ale.lives(), ale.cloneState()
        action = int(rng.integers(env.action_space.n))
        _, _, terminated, truncated, info = env.step(action)
        played = ale.getEpisodeFrameNumber() - before
        if terminated or truncated:
            env.reset()
            continue
        if info["life_loss"]:
            after = ale.cloneState()
            ale.restoreState(saved)  # replay the step frame by frame: the life goes on the last one played
            frames_to_loss = next(f for f in range(1, 5) if (ale.act(env._actions[action]), ale.lives())[1] < lives)
            assert frames_to_loss == played
            ale.restoreState(after)
            short_steps += played < 4
        else:
            assert played == 4
    assert short_steps > 0


def test_same_seed_same_trajectory():
    def rollout():
        env = make_atari100k_env("Breakout", seed=7)
        obs, _ = env.reset()
        out = [obs]
        for a in [1, 2, 3, 0] * 25:
            out.append(env.step(a)[0])
        return np.stack(out)

    assert np.array_equal(rollout(), rollout())
