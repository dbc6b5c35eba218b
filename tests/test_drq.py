import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, Planted, with_flags
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlplastic.init import xavier_uniform_zero_bias
from rlplastic.interventions import build_interventions
from rlplastic.replay import FrameReplay
from rlplastic.schedules import linearly_decaying_epsilon


def test_double_dqn_target_uses_online_argmax_and_target_values(drq):
    returns = torch.tensor([1.0, 2.0])
    discounts = torch.tensor([0.5, 0.0])  # second transition hit a terminal
    next_q_online = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 0.0]])
    next_q_target = torch.tensor([[10.0, 20.0, 30.0], [7.0, 8.0, 9.0]])
    # online picks action 1 -> target value 20: 1 + 0.5 * 20 = 11 (max over target would give 16)
    targets = drq.double_dqn_target(returns, discounts, next_q_online, next_q_target)
    assert targets.tolist() == [11.0, 2.0]


def test_epsilon_schedule_matches_drq_eps():
    eps = lambda step: linearly_decaying_epsilon(step, 1600, 5000, 0.01)  # noqa: E731
    assert eps(0) == 1.0 and eps(1600) == 1.0
    assert eps(4100) == pytest.approx(1.0 - 0.99 * 0.5)
    assert eps(6600) == pytest.approx(0.01) and eps(90_000) == pytest.approx(0.01)


def test_nature_cnn_with_same_padding_flattens_7744_features(drq):
    net = drq.QNetwork(num_actions=6)
    assert net.head[0].in_features == 7744
    q = net(torch.randint(0, 255, (3, 4, 84, 84), dtype=torch.uint8).float())
    assert q.shape == (3, 6)
    assert all(layer.bias.abs().sum() == 0 for layer in net.modules() if isinstance(layer, torch.nn.Linear))


def test_dueling_head_advantages_are_mean_centred(drq):
    net = drq.QNetwork(num_actions=4)
    x = torch.rand(2, 4, 84, 84) * 255
    h = net.head(net.encoder(x / 255.0))
    assert torch.allclose(net(x).mean(1), net.value(h).squeeze(1), atol=1e-5)


def test_head_is_dopamines_one_shared_512_layer(drq):
    """dopamine's FullRainbowNetwork (dueling, one atom): ONE Dense(512)+ReLU feeds both streams."""
    net = drq.QNetwork(num_actions=4)
    assert sum(p.numel() for p in net.parameters()) == 4_045_989
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(7744, 512), (512, 4), (512, 1)]
    assert net.advantage.in_features == net.value.in_features == 512


def test_validate_names_each_bad_value(drq):
    args = with_flags(drq.Args(), env_id="Tetris", total_steps=-5, batch_size=64, buffer_size=32, gamma=1.5)
    problems = "\n".join(drq.validate(args))
    assert "'Tetris'" in problems and "Alien" in problems
    assert "--total-steps -5" in problems
    assert "--batch-size 64: larger than the replay (--buffer-size 32)" in problems
    assert "--gamma 1.5" in problems
    assert drq.validate(drq.Args()) == []


def run_agent(*argv, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "agents" / "drq.py"), *argv],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def test_bad_input_exits_nonzero_before_training(tmp_path):
    proc = run_agent("--env-id", "Tetris", "--total-steps", "-1", "--output-dir", str(tmp_path / "r"))
    assert proc.returncode != 0
    assert "Tetris" in proc.stderr and "--total-steps -1" in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing started
    # numpy refuses a negative seed: it used to fail there, after the run folder was made
    proc = run_agent("--env-id", "Pong", "--seed", "-1", "--output-dir", str(tmp_path / "r"))
    assert proc.returncode != 0 and "--seed -1: a seed must be an integer in [0, 2147483647]" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()


SMOKE = [
    "--env-id", "Pong", "--total-steps", "300", "--learning-starts", "100", "--eval-episodes", "2",
    "--max-episode-steps", "200", "--log-every", "100", "--device", "cpu", "--batch-size", "8",
    "--diag-every", "150",
]  # fmt: skip


@pytest.mark.slow
def test_smoke_run_writes_results_and_tensorboard_and_is_deterministic(tmp_path):
    runs = []
    for name in ("a", "b"):
        proc = run_agent(*SMOKE, "--seed", "3", "--output-dir", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "step 300/300" in proc.stdout  # progress output
        runs.append(json.loads((tmp_path / name / "results.json").read_text()))
    first, second = runs
    for key in ("game", "seed", "total_steps", "eval_returns", "eval_mean", "config", "wall_time_s"):
        assert key in first
    assert first["game"] == "Pong" and first["seed"] == 3 and first["total_steps"] == 300
    assert first["method"] == "drq"
    assert len(first["eval_returns"]) == 2 and first["eval_lengths"] == [200, 200]
    assert first["eval_mean"] == pytest.approx(sum(first["eval_returns"]) / 2)
    assert first["config"]["n_step"] == 10 and first["config"]["env_id"] == "Pong"
    assert [r["step"] for r in first["train_log"]] == [100, 200, 300]  # first update at learning_starts
    # same seed on the CPU: bit-identical returns and losses
    assert first["eval_returns"] == second["eval_returns"]
    assert first["train_episodes"] == second["train_episodes"]
    assert first["train_log"] == second["train_log"]
    assert [d["step"] for d in first["diagnostics"]] == [150, 300]
    assert {"effective_rank/all", "srank/all", "dormant_0.1/encoder.4.1", "duplicate/head.0"} <= set(
        first["diagnostics"][0]
    )
    assert first["diagnostics"][1]["distance_from_init/all"] > first["diagnostics"][0]["distance_from_init/all"] > 0
    assert first["diagnostics"] == second["diagnostics"]

    events = EventAccumulator(str(tmp_path / "a"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"losses/td_loss", "losses/q_values", "charts/SPS", "charts/episodic_return"} <= tags
    assert {"plasticity/effective_rank/all", "plasticity/dead/encoder.0.1"} <= tags
    assert [e.step for e in events.Scalars("losses/td_loss")] == [100, 200, 300]
    episodes = events.Scalars("eval/episodic_return")  # each final evaluation episode, as CleanRL logs it
    assert [e.step for e in episodes] == [0, 1] and [e.value for e in episodes] == first["eval_returns"]

    # a finished run is never overwritten
    proc = run_agent(*SMOKE, "--output-dir", str(tmp_path / "a"))
    assert proc.returncode != 0 and "already holds a finished run" in proc.stderr


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_results(drq, tmp_path, monkeypatch):
    args = with_flags(
        drq.Args(),
        env_id="Breakout", seed=5, total_steps=240, learning_starts=60, eval_episodes=1, max_episode_steps=150,
        batch_size=8, log_every=60, checkpoint_every=120, device="cpu", track_tensorboard=False,
        ema=0.99, reset=("hare-tortoise", "head", "redo"), ht_every=50, head_every=70, redo_every=40,
        diag_every=80, eval_every=100, eval_every_episodes=1,
    )  # fmt: skip
    straight = drq.main(with_flags(args, output_dir=str(tmp_path / "straight")))
    assert [p["step"] for p in straight["eval_curve"]] == [100, 200, 240]  # the final evaluation last
    assert not (tmp_path / "straight" / "checkpoint.pt").exists()  # removed once results exist

    from rlplastic import runs

    real_save = runs.save_checkpoint

    def save_then_die(path, payload, agent):
        real_save(path, payload, agent)
        raise Interrupted  # as if killed right after the checkpoint at step 120

    monkeypatch.setattr(runs, "save_checkpoint", save_then_die)
    resumed_args = with_flags(args, output_dir=str(tmp_path / "resumed"))
    with pytest.raises(Interrupted):
        drq.main(resumed_args)
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()
    assert not (tmp_path / "resumed" / "results.json").exists()
    monkeypatch.setattr(runs, "save_checkpoint", real_save)

    with pytest.raises(SystemExit, match="other arguments.*learning_rate"):
        drq.main(with_flags(resumed_args, learning_rate=3e-4))
    resumed = drq.main(with_flags(resumed_args, save_model=True))  # save_model may change on resume
    for key in ("eval_returns", "train_episodes", "train_log", "diagnostics", "eval_curve"):
        assert resumed[key] == straight[key]
    weights = torch.load(tmp_path / "resumed" / "q_network.pt", weights_only=True)
    assert weights["head.0.weight"].shape == (512, 7744)
    # evaluating during training leaves training untouched (own environments and random streams)
    quiet = drq.main(with_flags(args, eval_every=0, output_dir=str(tmp_path / "quiet")))
    assert quiet["train_log"] == straight["train_log"] and quiet["train_episodes"] == straight["train_episodes"]
    assert quiet["eval_returns"] == straight["eval_returns"]
    assert [d["step"] for d in resumed["diagnostics"]] == [80, 160, 240]
    assert resumed["train_log"][-1]["step"] == 240
    assert resumed["method"] == "drq+hare-tortoise+head+redo"


def test_conflicting_interventions_fail_fast(drq):
    def problems(**kw):
        return "\n".join(drq.validate(with_flags(drq.Args(), **kw)))

    assert "needs --ema > 0" in problems(reset=("hare-tortoise",))
    assert "redo and cbp both replace units" in problems(reset=("redo",), continual=("cbp",))
    assert "redo and lifecycle both replace units" in problems(reset=("redo",), continual=("lifecycle",))
    assert "head given twice" in problems(reset=("head", "head"))
    assert "--head-every 0" in problems(reset=("head",), head_every=0)
    assert problems(reset=("hare-tortoise", "head"), ema=0.995) == ""


def test_unknown_intervention_is_refused_by_the_cli(tmp_path):
    proc = run_agent("--reset", "dropout", "--output-dir", str(tmp_path / "r"))
    assert proc.returncode != 0 and "dropout" in proc.stderr and "hare-tortoise" in proc.stderr
    proc = run_agent("--reset", "hare-tortoise", "--output-dir", str(tmp_path / "r"))
    assert proc.returncode != 0 and "needs --ema" in proc.stderr


def filled_replay(num_actions=4, steps=300, replay=None):
    rng = np.random.default_rng(0)
    replay = replay if replay is not None else FrameReplay(1_000, 10, 0.99, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        frame = rng.integers(0, 255, (84, 84), dtype=np.uint8)
        replay.add(frame, int(rng.integers(num_actions)), float(rng.random() < 0.2), bool(rng.random() < 0.02), False)
    return replay


def run_updates(drq, args, steps, graph_order=False):
    """`steps` updates with the interventions stepped as the eager loop does, or (graph_order) as
    the CUDA-graph loop does: every device_step inside the captured update, then every host_step."""
    torch.manual_seed(0)
    replay = filled_replay()
    q, target, optimizer = drq.build_learner(args, 4, torch.device("cpu"))
    ema_target = None if target is q else target
    sample_states = lambda n: replay.sample(n).states  # noqa: E731
    interventions = build_interventions(
        args.interventions, q, ema_target, optimizer, sample_states, xavier_uniform_zero_bias, drq.HEAD_MODULES
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        drq.update(args, q, target, optimizer, replay, generator)
        if graph_order:
            interventions.device_step()  # each one's device work, as the captured graph runs it
            interventions.host_step()
        else:
            for intervention in interventions:
                intervention.step()
    return q, target, interventions


def test_the_graph_loops_order_of_intervention_work_gives_the_eager_results(drq):
    """On CUDA the update and the interventions' device_step are one captured graph and the
    host_steps follow; for the graph-safe interventions that is the eager sequence, exactly."""
    args = with_flags(
        drq.Args(), batch_size=4, ema=0.9, reset=("hare-tortoise", "head", "shrink-perturb", "redo"),
        ht_every=3, head_every=4, sp_every=5, redo_every=2, redo_batch=8,
    )  # fmt: skip
    eager_q, eager_target, eager = run_updates(drq, args, 10)
    graph_q, graph_target, graph = run_updates(drq, args, 10, graph_order=True)
    assert all(i.graph_safe for i in graph) and [i.resets for i in graph.items[:3]] == [3, 2, 2]
    for a, b in zip([*eager_q.parameters(), *eager_target.parameters()],
                    [*graph_q.parameters(), *graph_target.parameters()], strict=True):  # fmt: skip
        assert torch.equal(a, b)


def test_flags_build_the_interventions_with_their_schedules(drq):
    args = with_flags(
        drq.Args(), batch_size=4, ema=0.9, reset=("hare-tortoise", "head", "shrink-perturb"),
        reset_every=6, head_every=4,
    )  # fmt: skip
    q, target, interventions = run_updates(drq, args, 12)
    ht, head, sp = interventions
    assert type(ht).__name__ == "HareTortoise" and ht.due.period == 6 and ht.resets == 2
    assert type(head).__name__ == "HeadReset" and head.due.period == 4 and head.resets == 3
    assert head.models == [q, target] and set(head.groups) == {"head", "advantage", "value"}
    assert type(sp).__name__ == "ShrinkPerturb" and sp.due.period == 6 and sp.groups == {"": (0.4, 0.1)}
    plain = build_interventions(with_flags(drq.Args(), ema=0.995).interventions, q, target, None, filled_replay)
    assert len(plain) == 1 and plain.items[0].due.period == 0  # the EMA target alone never resets the hare


def test_unit_replacing_interventions_act_on_the_drq_network(drq):
    args = with_flags(drq.Args(), batch_size=4, reset=("redo",), redo_every=5, redo_tau=0.5, redo_batch=16)
    q, _, (redo,) = run_updates(drq, args, 10)
    # every hidden layer, the three 'SAME'-padded convolutions included (Sokar et al. 2023 recycle
    # the dormant units of all layers), the dueling outputs never
    hidden = [q.encoder[0][1], q.encoder[2][1], q.encoder[4][1], q.head[0]]
    assert [layer for layer, _ in redo.layers] == hidden
    assert len(redo.recycled) == 2 and sum(redo.recycled) > 0  # two passes
    args = with_flags(drq.Args(), batch_size=4, continual=("cbp", "noise"), cbp_rate=0.05, cbp_maturity=3)
    q, _, (cbp, noise) = run_updates(drq, args, 8)
    assert [layer for layer, _ in cbp.layers] == [q.encoder[0][1], q.encoder[2][1], q.encoder[4][1], q.head[0]]
    assert cbp.replaced > 0 and noise.t == 8
    lifecycle = dict(continual=("lifecycle",), lifecycle_lifespan=(2, 4), lifecycle_recovery=(1, 2))
    args = with_flags(drq.Args(), batch_size=4, **lifecycle)
    q, _, interventions = run_updates(drq, args, 6)
    lifecycle_layers = [m for m in q.modules() if hasattr(m, "lifecycle_step")]
    assert [type(i).__name__ for i in interventions] == ["Lifecycle"]
    assert len(lifecycle_layers) == 4  # 3 convs + the shared dense; the outputs stay plain
    assert all(layer.life.max() <= 4 for layer in lifecycle_layers)
    assert any((layer.scaler < 1).any() or not layer.active.all() for layer in lifecycle_layers)


@pytest.mark.parametrize("kind", ["code", "truncated", "foreign"])
def test_a_bad_checkpoint_is_refused_by_name_and_never_runs_code(drq, tmp_path, kind):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    marker = tmp_path / "code_ran"
    if kind == "code":
        torch.save({"config": {}, "payload": Planted(marker)}, run_dir / "checkpoint.pt")
    elif kind == "truncated":
        torch.save({"config": {}, "weights": torch.zeros(1000)}, run_dir / "checkpoint.pt")
        data = (run_dir / "checkpoint.pt").read_bytes()
        (run_dir / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    else:
        (run_dir / "checkpoint.pt").write_text("not a checkpoint at all")
    args = with_flags(
        drq.Args(), env_id="Pong", total_steps=100, learning_starts=50, device="cpu", output_dir=str(run_dir)
    )
    with pytest.raises(SystemExit) as exit_info:
        drq.main(args)
    message = str(exit_info.value)
    assert f"{run_dir / 'checkpoint.pt'} is not a readable checkpoint" in message and "move it away" in message
    assert not marker.exists()  # the planted code never ran
    assert not (run_dir / "results.json").exists()


def test_a_run_with_the_2021_runners_frame_noops(drq, tmp_path, monkeypatch):
    """--noop-unit frames: training and evaluation episodes start after 0..29 NOOP frames; it is
    recorded in the run's config."""
    from rlplastic import runs

    units, real_make = [], runs.make_atari100k_env

    def make_env(*a, **kw):
        units.append(kw["noop_unit"])
        return real_make(*a, **kw)

    monkeypatch.setattr(runs, "make_atari100k_env", make_env)
    args = with_flags(
        drq.Args(), env_id="Pong", seed=2, total_steps=80, learning_starts=40, eval_episodes=2, max_episode_steps=30,
        batch_size=4, device="cpu", track_tensorboard=False, diag_every=0, noop_unit="frames",
        output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    results = drq.main(args)
    assert results["config"]["noop_unit"] == "frames" and results["eval_lengths"] == [30, 30]
    assert [e["length"] for e in results["train_episodes"]] == [30, 30]
    assert len(units) >= 2 and set(units) == {"frames"}  # the training environment and the evaluation's


@pytest.mark.slow
def test_a_saved_network_is_evaluated_again_at_another_epsilon(drq, tmp_path):
    from rlplastic.files import atomic_torch_save

    torch.manual_seed(0)
    atomic_torch_save(tmp_path / "q_network.pt", drq.QNetwork(6).state_dict())  # Pong: 6 actions
    command = [sys.executable, str(ROOT / "scripts" / "drq_evaluate.py"), str(tmp_path / "q_network.pt"),
               "--env-id", "Pong", "--episodes", "2", "--envs", "2", "--max-episode-steps", "30",
               "--epsilon", "0.5", "--device", "cpu"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Pong epsilon 0.5, noops in agent-steps: mean" in done.stdout
    assert "over 2 episodes, mean length 30" in done.stdout
    frames = subprocess.run(command + ["--noop-unit", "frames"], capture_output=True, text=True, timeout=300)
    assert frames.returncode == 0 and "noops in frames: mean" in frames.stdout, frames.stderr
    wrong_game = subprocess.run(command[:3] + ["--env-id", "Boxing", "--device", "cpu"], capture_output=True,
                                text=True, timeout=300)  # fmt: skip
    assert wrong_game.returncode != 0 and "is not a DrQ network for Boxing (18 actions)" in wrong_game.stderr


def test_a_diverged_run_stops_keeps_its_last_checkpoint_and_writes_no_results(drq, tmp_path, monkeypatch):
    args = with_flags(
        drq.Args(),
        env_id="Pong", seed=3, total_steps=200, learning_starts=40, eval_episodes=1, max_episode_steps=100,
        batch_size=4, log_every=40, checkpoint_every=80, device="cpu", track_tensorboard=False, diag_every=0,
        output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    real_update, calls = drq.update, []

    def diverging_update(*a, **kw):
        losses = real_update(*a, **kw)
        calls.append(1)
        if len(calls) > 60:  # NaN from update 61 (step 100)
            losses["td_loss"] = losses["td_loss"] * float("nan")
        return losses

    monkeypatch.setattr(drq, "update", diverging_update)
    with pytest.raises(SystemExit, match="training diverged by step 120 .*checkpoint.pt is kept; no results"):
        drq.main(args)
    assert not (tmp_path / "run" / "results.json").exists()
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 80  # the last good one
    record = json.loads((tmp_path / "run" / "diverged.json").read_text())  # what a sweep reads
    assert record["step"] == 120 and record["losses"]["td_loss"] == "nan" and "diverged" in record["message"]
