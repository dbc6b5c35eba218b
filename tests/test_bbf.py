import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ROOT, load_agent, with_flags
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlplastic.init import xavier_uniform_zero_bias
from rlplastic.interventions import HareTortoise, build_interventions
from rlplastic.interventions.base import fresh_copy
from rlplastic.replay import PrioritizedFrameReplay


@pytest.fixture(scope="module")
def bbf():
    return load_agent("bbf")


SUPPORT = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])


@pytest.mark.parametrize(
    ("reward", "discount", "probs", "expected"),
    [
        (0.5, 1.0, [0, 0, 1, 0, 0], [0, 0, 0.5, 0.5, 0]),  # lands between atoms 0 and 1: split evenly
        (1.0, 0.5, [0.2] * 5, [0, 0, 0.3, 0.4, 0.3]),  # targets 0, .5, 1, 1.5, 2
        (5.0, 1.0, [1, 0, 0, 0, 0], [0, 0, 0, 0, 1]),  # 3 is clipped to v_max
        (-0.3, 0.0, [0, 0, 0, 0, 1], [0, 0.3, 0.7, 0, 0]),  # terminal: all mass at the reward
    ],
)
def test_c51_projection_by_hand(bbf, reward, discount, probs, expected):
    out = bbf.project_distribution(
        torch.tensor([reward]), torch.tensor([discount]), torch.tensor([probs], dtype=torch.float32), SUPPORT
    )
    assert out[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert out.sum().item() == pytest.approx(1.0)


def test_spr_loss_on_planted_vectors(bbf):
    predictions = torch.tensor([[[3.0, 0.0], [0.0, 2.0]]])  # (B=1, K=2, D=2)
    targets = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    # step 1: same direction -> 0; step 2: orthogonal unit vectors -> 1 + 1 = 2; mean over K = 1
    assert bbf.spr_loss(predictions, targets, torch.ones(1, 2)).item() == pytest.approx(1.0)
    assert bbf.spr_loss(predictions, targets, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.0)
    assert bbf.spr_loss(-predictions, targets, torch.ones(1, 2)).item() == pytest.approx((4 + 2) / 2)


def test_annealing_schedules_at_chosen_steps(bbf):
    args = bbf.Args()
    assert [bbf.n_step_at(args, s) for s in (0, 2_500, 5_000, 10_000, 30_000)] == [10, 7, 5, 3, 3]
    assert bbf.gamma_at(args, 0) == pytest.approx(0.97)
    assert bbf.gamma_at(args, 5_000) == pytest.approx(1 - 0.03 * 0.1**0.5)  # 1 - gamma geometric
    assert bbf.gamma_at(args, 10_000) == pytest.approx(0.997)
    assert bbf.gamma_at(args, 50_000) == pytest.approx(0.997)


def resets_in_a_run(bbf, args) -> list[int]:
    """The agent steps taken before each reset, as the loop asks the schedule (t = step - 1)."""
    schedule = bbf.ResetSchedule(bbf.reset_interval(args), args.no_resets_after, args.reset_rule)
    return [t for t in range(0, args.total_steps) if schedule.due(t)]


def test_reset_schedule_is_the_references_three_resets(bbf):
    """BBFAgent: reset when training_steps > next_reset (first 20,000), next_reset = t + 20,000,
    skipped when that passes no_resets_after = 100,000: three resets, none near 80k."""
    args = bbf.Args()
    assert resets_in_a_run(bbf, args) == [20_001, 40_002, 60_003]
    assert resets_in_a_run(bbf, with_flags(args, bbf_reset_every=0)) == []


def test_the_2023_reset_rule_resets_four_times_at_rr2_and_19_at_rr8_as_the_presets_do(bbf):
    """The 2023 reference compared t >= next_reset: one reset more, the last 20k steps before the end."""
    args = with_flags(bbf.Args(), reset_rule="2023")
    assert resets_in_a_run(bbf, args) == [20_000, 40_000, 60_000, 80_000]
    rr8 = resets_in_a_run(bbf, with_flags(args, replay_ratio=8))
    assert len(rr8) == 19 and rr8[:2] == [5_000, 10_000] and rr8[-1] == 95_000
    presets = {name: preset for name, (_, preset) in bbf.PRESETS.items()}
    assert presets["bbf-rr2"].reset_rule == presets["bbf-rr8"].reset_rule == "2023"
    assert resets_in_a_run(bbf, presets["bbf-rr8"]) == rr8
    assert bbf.Args().reset_rule == "2024"


def test_replay_ratio_8_resets_every_40k_gradient_steps(bbf):
    """The reference keeps 40k gradient steps between resets: 20k env steps at RR2 (BBF.gin),
    5k at RR8 (SR_SPR.gin: 'change if you change the replay ratio')."""
    args = with_flags(bbf.Args(), replay_ratio=8)
    assert bbf.reset_interval(args) == 5_000 and bbf.method_label(args) == "bbf-rr8"
    resets = resets_in_a_run(bbf, args)
    assert resets[:3] == [5_001, 10_002, 15_003] and len(resets) == 18 and resets[-1] + 5_000 <= 100_000
    assert bbf.reset_interval(with_flags(args, bbf_reset_every=10_000)) == 10_000


def test_spr_path_uses_the_projection_without_relu(bbf):
    """spr_networks: the ReLU sits on the Q path only; SPR targets are target.projection(z) and
    predictions predictor(projection(z)), both free to go negative."""
    torch.manual_seed(0)
    net = bbf.BBFNetwork(num_actions=3, width_scale=1, hidden_dim=64)
    assert isinstance(net.projection, torch.nn.Linear)
    x = torch.randint(0, 256, (4, 4, 84, 84), dtype=torch.uint8)
    latent = net.latent(x)
    raw = net.projection(latent.flatten(1))
    assert (raw < 0).any()
    torch.testing.assert_close(net.project(x), raw)
    actions = torch.zeros(4, 1, dtype=torch.long)
    torch.testing.assert_close(
        net.spr_predictions(latent, actions)[:, 0],
        net.predictor(net.projection(net.transition(latent, actions[:, 0]).flatten(1))),
    )
    torch.testing.assert_close(net(x), net.head(torch.relu(raw)))


def test_full_size_network_shapes(bbf):
    net = bbf.BBFNetwork(num_actions=6)
    x = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    latent = net.latent(x)
    assert latent.shape == (2, 128, 11, 11)  # 'SAME' pooling 84 -> 42 -> 21 -> 11, width 4
    flat = latent.flatten(1)
    assert flat.min(1).values.tolist() == pytest.approx([0, 0]) and flat.max(1).values.max() <= 1
    assert net.projection.in_features == 15_488 and net.projection.out_features == 2048
    assert net(x).shape == (2, 6, 51)
    assert net.spr_predictions(latent, torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 2048)
    assert all(m.bias.abs().sum() == 0 for m in net.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d))


def test_same_max_pool_pads_bottom_right_with_minus_infinity(bbf):
    pool = bbf.SameMaxPool(4)
    x = -torch.arange(16.0).view(1, 1, 4, 4) - 1  # all negative: zero padding would win the max
    out = pool(x)
    assert out.shape == (1, 1, 2, 2)
    assert out[0, 0].tolist() == [[-1.0, -3.0], [-9.0, -11.0]]


def small_learner(bbf, **kw):
    args = with_flags(bbf.Args(), width_scale=1, hidden_dim=32, device="cpu", **kw)
    online, target, optimizer = bbf.build_learner(args, 4, torch.device("cpu"))
    return args, online, target, optimizer


def test_bbf_reset_interpolates_encoder_and_renews_the_rest(bbf):
    args, online, target, optimizer = small_learner(bbf)
    with torch.no_grad():
        for p in list(online.parameters()) + list(target.parameters()):
            p.add_(torch.randn_like(p))  # as if trained: biases are no longer zero
    online(torch.zeros(2, 4, 84, 84)).sum().backward()
    optimizer.step()
    before_online = {k: v.clone() for k, v in online.state_dict().items()}
    before_target = {k: v.clone() for k, v in target.state_dict().items()}
    reset = bbf.bbf_reset(args, online, target, optimizer)
    torch.manual_seed(11)
    fresh = {  # the draws ShrinkPerturb makes, in its order: model, then group
        (i, name): fresh_copy(model.get_submodule(name), xavier_uniform_zero_bias).state_dict()
        for i, model in enumerate((online, target))
        for name in bbf.BBF_RESET_GROUPS
    }
    torch.manual_seed(11)
    reset.apply()
    for i, (model, before) in enumerate(((online, before_online), (target, before_target))):
        for name in bbf.BBF_RESET_GROUPS:
            for key, value in model.get_submodule(name).state_dict().items():
                old, new = before[f"{name}.{key}"], fresh[(i, name)][key]
                if name in ("encoder", "transition"):
                    torch.testing.assert_close(value, 0.5 * old + 0.5 * new)
                else:
                    torch.testing.assert_close(value, new)  # projection, predictor, head: fully fresh
    assert not torch.equal(online.head.value.weight, target.head.value.weight)  # each its own draw
    for p in online.parameters():  # optimizer state re-initialized: zeroed in place, step count included
        assert all(not (v.any() if torch.is_tensor(v) else v) for v in optimizer.state[p].values())


def filled_replay(steps=40, capacity=64, terminal_at=()):
    replay = PrioritizedFrameReplay(capacity, n_step=10, gamma=0.99, future_steps=5, generator=torch.Generator())
    replay.generator.manual_seed(0)
    for t in range(steps):
        frame = np.full((84, 84), t % 256, dtype=np.uint8)
        replay.add(frame, action=t % 4, reward=1.0, terminal=t in terminal_at, truncated=False)
    return replay


@pytest.mark.slow
def test_per_sampling_frequencies_match_priorities():
    replay = filled_replay()
    sampleable = np.flatnonzero(replay._sampleable_host)
    assert replay.priorities[sampleable].eq(1.0).all()  # new items: the max priority so far (1)
    chosen = torch.tensor(sampleable[:4])
    replay.update_priorities(chosen, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    replay.update_priorities(torch.tensor(sampleable[4:]), torch.zeros(len(sampleable) - 4))
    counts = torch.zeros(replay.capacity)
    for _ in range(50):
        batch = replay.sample(400)
        counts += torch.bincount(batch.indices, minlength=replay.capacity)
    frequencies = (counts[chosen] / counts.sum()).tolist()
    assert frequencies == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=0.01)
    assert counts.sum() == counts[chosen].sum()  # zero priority: never drawn
    # importance weights: 1 / sqrt(P), divided by the batch's largest (the least likely slot's)
    expected = (1 / torch.sqrt(batch.probabilities)) / (1 / torch.sqrt(batch.probabilities)).max()
    torch.testing.assert_close(batch.weights, expected)
    assert batch.probabilities.min().item() == pytest.approx(0.1)
    replay.add(np.zeros((84, 84), np.uint8), 0, 0.0, False, False)
    assert replay.priorities[(replay.head - 1) % replay.capacity].item() == 4.0  # max recorded priority


def test_a_gamma_on_the_device_gives_the_float_gammas_returns_and_update(bbf):
    """A captured BBF step reads the annealed gamma from a device scalar filled in place: the
    n-step returns and discounts, and one update from the same state, match the float gamma's."""
    replay = filled_replay(terminal_at=(25,))
    slots = torch.tensor(np.flatnonzero(replay._sampleable_host)[:8])
    by_float = replay.transitions(slots, n_step=7, gamma=0.973)
    by_tensor = replay.transitions(slots, n_step=7, gamma=torch.tensor(0.973))
    torch.testing.assert_close(by_tensor.returns, by_float.returns)
    torch.testing.assert_close(by_tensor.discounts, by_float.discounts)
    losses = []
    for gamma in (0.973, torch.tensor(0.973)):
        torch.manual_seed(0)
        args, online, target, optimizer = small_learner(bbf, batch_size=8)
        support = torch.linspace(-10, 10, 51)
        out = bbf.update(args, online, target, optimizer, filled_replay(), torch.Generator().manual_seed(0),
                         support, 7, gamma)  # fmt: skip
        losses.append((out["loss"], online.head.value.weight.detach().clone()))
    torch.testing.assert_close(losses[0][0], losses[1][0])
    torch.testing.assert_close(losses[0][1], losses[1][1])


def test_future_sequences_stop_at_episode_boundaries():
    replay = filled_replay(terminal_at=(12,))
    batch = replay.sample(256)
    for i, t in enumerate(batch.indices.tolist()):
        assert batch.future_actions[i].tolist() == [(t + k) % 4 for k in range(5)]
        # s_{t+k} continues s_t's trajectory while no step t .. t+k-1 was terminal (the one at 12)
        expected = [float(not any(t <= 12 <= t + j - 1 for j in range(1, k + 1))) for k in range(1, 6)]
        assert batch.future_mask[i].tolist() == expected
        for k in range(5):
            assert torch.equal(batch.future_states[i, k], replay.states_at(torch.tensor([t + k + 1]))[0])


def test_annealed_n_step_returns():
    replay = filled_replay()
    slots = torch.tensor([5])
    three = replay.transitions(slots, n_step=3, gamma=0.5)
    assert three.returns.item() == pytest.approx(1 + 0.5 + 0.25)
    assert three.discounts.item() == pytest.approx(0.125)
    assert torch.equal(three.next_states, replay.states_at(torch.tensor([8])))
    with pytest.raises(ValueError, match="n_step 11"):
        replay.transitions(slots, n_step=11)


def test_one_update_trains_and_sets_priorities(bbf):
    args, online, target, optimizer = small_learner(bbf, batch_size=8)
    replay = filled_replay()
    sample_states = lambda n: replay.sample(n).states  # noqa: E731
    interventions = build_interventions(args.interventions, online, target, optimizer, sample_states)
    before = online.head.value.weight.clone()
    support = torch.linspace(-10, 10, 51)
    out = bbf.update(args, online, target, optimizer, replay, torch.Generator().manual_seed(0), support, 10, 0.97)
    for intervention in interventions:
        intervention.step()
    assert set(out) == {"loss", "c51_loss", "spr_loss"} and torch.isfinite(out["loss"])
    assert not torch.equal(online.head.value.weight, before)
    assert not replay.priorities.eq(1.0).all()  # sampled slots got sqrt(loss + 1e-10)
    no_spr = bbf.update(
        replace(args, no_spr=True), online, target, optimizer, replay, torch.Generator(), support, 10, 0.97
    )
    assert "spr_loss" not in no_spr
    bf16 = bbf.update(
        replace(args, amp="bf16"), online, target, optimizer, replay, torch.Generator(), support, 10, 0.97
    )
    assert torch.isfinite(bf16["loss"])


def test_interventions_and_labels(bbf):
    args, online, target, optimizer = small_learner(bbf, reset=("hare-tortoise", "redo"), no_spr=True)
    replay = filled_replay()
    ema, redo = build_interventions(args.interventions, online, target, optimizer, lambda n: replay.sample(n).states)
    assert isinstance(ema, HareTortoise) and ema.momentum == pytest.approx(0.995) and ema.due.period == 4_000
    assert type(redo).__name__ == "ReDo"
    assert bbf.method_label(args) == "bbf+hare-tortoise+redo-nospr"
    assert bbf.method_label(with_flags(bbf.Args(), replay_ratio=8)) == "bbf-rr8"
    plain = build_interventions(bbf.Args().interventions, online, target, optimizer, None).items[0]
    assert plain.due.period == 0  # a pure EMA target without hare-tortoise


def test_validate_names_each_bad_value(bbf):
    args = with_flags(bbf.Args(), env_id="Tetris", replay_ratio=0, n_step_end=12, ema=2.0, reset=("redo", "head"),
                      continual=("cbp",))  # fmt: skip
    problems = "\n".join(bbf.validate(args))
    for text in ("Tetris", "--replay-ratio 0", "--n-step-end 12", "--ema 2.0", "redo and cbp", "not support head"):
        assert text in problems


def run_agent(*argv, timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "agents" / "bbf.py"), *argv], capture_output=True, text=True, timeout=timeout,
        env=env,
    )  # fmt: skip


def test_bad_input_exits_before_training(tmp_path):
    proc = run_agent("--env-id", "Tetris", "--replay-ratio", "-2", "--output-dir", str(tmp_path / "r"))
    assert proc.returncode != 0 and "Tetris" in proc.stderr and "--replay-ratio -2" in proc.stderr
    assert not (tmp_path / "r").exists()


TINY = dict(
    width_scale=1, hidden_dim=32, batch_size=4, total_steps=160, learning_starts=100, bbf_reset_every=130,
    anneal_steps=100, eval_episodes=1, eval_envs=1, max_episode_steps=150, buffer_size=1000, log_every=40,
    diag_every=80, device="cpu",
)  # fmt: skip


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_smoke_run_on_a_real_game_then_resume_identically(bbf, tmp_path, monkeypatch):
    args = with_flags(bbf.Args(), env_id="Breakout", seed=2, checkpoint_every=120, **TINY)
    straight = bbf.main(with_flags(args, output_dir=str(tmp_path / "straight")))
    assert straight["grad_steps"] == 2 * (160 - 100 + 1) and straight["resets"] == 1
    assert straight["method"] == "bbf" and straight["agent"] == "bbf" and len(straight["eval_returns"]) == 1
    log = {row["step"]: row for row in straight["train_log"]}
    assert {"loss", "c51_loss", "spr_loss"} <= set(log[120]) and np.isfinite(log[160]["loss"])
    assert [d["step"] for d in straight["diagnostics"]] == [80, 160]
    events = EventAccumulator(str(tmp_path / "straight"))
    events.Reload()
    assert {"losses/spr_loss", "charts/n_step", "charts/gamma", "charts/resets"} <= set(events.Tags()["scalars"])
    # 42 gradient steps into the anneal at step 120: round(10 * 0.3^0.42) = 6; at 160, 56 steps after the
    # reset at step 132 (131 > 130 steps taken) restarted it: round(10 * 0.3^0.56) = 5 (without it: n = 3)
    assert [e.value for e in events.Scalars("charts/n_step")][-2:] == [6, 5]

    from rlplastic import runs

    real_save = runs.save_checkpoint

    def save_then_die(path, payload, agent):
        real_save(path, payload, agent)
        raise Interrupted

    monkeypatch.setattr(runs, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        bbf.main(with_flags(args, output_dir=str(tmp_path / "resumed")))
    monkeypatch.setattr(runs, "save_checkpoint", real_save)
    resumed = bbf.main(with_flags(args, output_dir=str(tmp_path / "resumed")))
    for key in ("eval_returns", "train_episodes", "train_log", "diagnostics", "grad_steps", "resets"):
        assert resumed[key] == straight[key]
    results = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert results["config"]["replay_ratio"] == 2 and not (tmp_path / "resumed" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_hare_tortoise_variant_runs_from_the_shell(tmp_path):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    proc = run_agent("--env-id", "Pong", *flags, "--reset", "hare-tortoise", "--no-spr", "--ht-every", "30",
                     "--output-dir", str(tmp_path / "ht"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step 160/160" in proc.stdout
    results = json.loads((tmp_path / "ht" / "results.json").read_text())
    assert results["method"] == "bbf+hare-tortoise-nospr"
    assert all("spr_loss" not in row for row in results["train_log"])


@pytest.mark.slow
def test_a_diverged_run_stops_and_writes_no_results(bbf, tmp_path, monkeypatch):
    real_update = bbf.update

    def diverging_update(*a, **kw):
        out = real_update(*a, **kw)
        return out | {"loss": out["loss"] * float("nan")}

    monkeypatch.setattr(bbf, "update", diverging_update)
    args = with_flags(bbf.Args(), env_id="Pong", seed=1, checkpoint_every=0, output_dir=str(tmp_path / "run"), **TINY)
    with pytest.raises(SystemExit, match="training diverged by step 120 .*'loss': nan.*no results written"):
        bbf.main(args)
    assert not (tmp_path / "run" / "results.json").exists()
