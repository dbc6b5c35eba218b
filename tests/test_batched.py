"""Many runs in one process (rlplastic.batched, agents/drq_batched.py with several games and seeds)."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, with_flags
from test_drq import filled_replay

from rlplastic.batched import StackedModules, batch_problems, group_by, update_mode_of
from rlplastic.cli import expand_runs
from rlplastic.replay import FrameReplay, StackedFrameReplays


def test_stacked_modules_compute_each_runs_forward_and_gradient(drq):
    torch.manual_seed(0)
    nets = [drq.QNetwork(6) for _ in range(3)]
    alone = [copy.deepcopy(net) for net in nets]
    stack = StackedModules(nets)
    x = torch.randint(0, 255, (3, 5, 4, 84, 84), dtype=torch.uint8)
    out = stack(x)
    for i, net in enumerate(alone):
        torch.testing.assert_close(out[i], net(x[i]))
    out.pow(2).mean((1, 2)).sum().backward()
    stack.scatter_grads()
    for i, net in enumerate(alone):
        net(x[i]).pow(2).mean().backward()
        for a, b in zip(nets[i].parameters(), net.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad)
    # each run's parameters are views of the stack: an in-place change of one run shows there only
    with torch.no_grad():
        nets[1].value.weight.fill_(7.0)
    assert (stack.params["value.weight"][1] == 7).all() and not (stack.params["value.weight"][0] == 7).any()
    with pytest.raises(ValueError, match="one architecture"):
        StackedModules([drq.QNetwork(6), drq.QNetwork(6, hidden=256)])


def test_runs_of_games_with_different_action_counts_share_one_stack(drq_batched, drq):
    """Heads of 3, 6 and 18 actions stacked zero-padded to 18: each run's module keeps its own
    shapes (views of its rows); with the action mask the batched forward gives each run its own
    Q-values (padded actions -inf, never chosen), gradients and Adam steps touch only real rows."""
    torch.manual_seed(0)
    nets = [drq.QNetwork(a) for a in (3, 6, 18)]
    alone = [copy.deepcopy(net) for net in nets]
    stack = StackedModules(nets)
    assert stack.params["advantage.weight"].shape == (3, 18, 512)
    assert [tuple(net.advantage.weight.shape) for net in nets] == [(3, 512), (6, 512), (18, 512)]
    valid = drq_batched.action_mask(stack)
    assert valid.sum(1).tolist() == [3, 6, 18]
    x = torch.randint(0, 255, (3, 5, 4, 84, 84), dtype=torch.uint8)
    out = stack(x, valid)
    for i, net in enumerate(alone):
        n = net.advantage.out_features
        torch.testing.assert_close(out[i, :, :n], net(x[i]))
        assert (out[i, :, n:] == float("-inf")).all()
    q = out.gather(2, torch.zeros(3, 5, 1, dtype=torch.long))  # action 0 of every run
    q.pow(2).sum().backward()
    stack.scatter_grads()
    assert (stack.params["advantage.weight"].grad is None) and nets[0].advantage.weight.grad.shape == (3, 512)
    for i, net in enumerate(alone):
        net(x[i])[:, 0].pow(2).sum().backward()
        for a, b in zip(nets[i].parameters(), net.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    for net in nets:
        torch.optim.Adam(net.parameters(), lr=0.1).step()
    assert (stack.params["advantage.weight"][0, 3:] == 0).all() and (stack.params["advantage.bias"][1, 6:] == 0).all()
    assert (stack.params["advantage.weight"][0, :3] != 0).all()


def test_a_batched_update_is_n_separate_updates_and_interventions_stay_in_their_run(drq_batched, drq):
    args = with_flags(drq.Args(), batch_size=4, ema=0.9, reset=("head",), head_every=1_000)
    learners, alone = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        q = drq.QNetwork(4)
        alone.append(drq.build_learner(args, 4, torch.device("cpu"), copy.deepcopy(q)))
        learners.append(q)
    stack = StackedModules(learners)
    learners = [drq.build_learner(args, 4, torch.device("cpu"), q) for q in learners]
    targets = StackedModules([target for _, target, _ in learners])
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    replays = StackedFrameReplays(3, 1_000, 10, 0.99, generators=generators)
    for i in range(3):
        filled_replay(replay=replays[i])
    alone_generators = [torch.Generator().manual_seed(i) for i in range(3)]
    alone_replays = [filled_replay(replay=FrameReplay(1_000, 10, 0.99, generator=g)) for g in alone_generators]
    for _ in range(4):
        losses = drq_batched.batched_update(args, stack, targets, [opt for _, _, opt in learners], replays, generators,
                                    drq_batched.action_mask(stack))  # fmt: skip
        separate = [drq.update(args, *alone[i], alone_replays[i], alone_generators[i]) for i in range(3)]
        torch.testing.assert_close(losses["td_loss"], torch.stack([s["td_loss"] for s in separate]))
    for (q, _, _), (q_alone, _, _) in zip(learners, alone, strict=True):
        for a, b in zip(q.parameters(), q_alone.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # a head reset of run 1 re-draws run 1's head only
    from rlplastic.interventions import HeadReset

    before = stack.params["value.weight"].clone()
    HeadReset([learners[1][0]], ["value"], every=0).apply()
    after = stack.params["value.weight"]
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert not torch.equal(after[1], before[1])


def test_several_games_and_seeds_on_the_command_line_become_one_run_each():
    runs = expand_runs(["hare-tortoise", "--env-id", "Pong", "Boxing", "--seed", "1", "2", "--output-dir", "out"])
    assert len(runs) == 4 and runs[0][0] == "hare-tortoise"
    assert runs[1][-4:] == ["--env-id", "Pong", "--seed", "2"] and "out/{method}/{game}/seed{seed}" in runs[1]
    assert expand_runs(["--env-id", "Pong", "--seed", "3", "--output-dir", "o"]) == [
        ["--output-dir", "o", "--env-id", "Pong", "--seed", "3"]
    ]  # one run: its folder as given
    assert group_by([6, 18, 6]) == {6: [0, 2], 18: [1]}


def test_runs_that_cannot_share_a_process_are_refused(drq):
    base = drq.Args()
    problems = "\n".join(batch_problems([base, with_flags(base, seed=2, learning_rate=3e-4)]))
    assert "--learning-rate: runs in one process share one configuration" in problems
    assert "a (game, seed) repeats" in "\n".join(batch_problems([base, base]))
    lifecycle = with_flags(base, continual=("lifecycle",))
    assert "--continual lifecycle: not in these batched runs" in "\n".join(
        batch_problems([lifecycle, with_flags(lifecycle, seed=2)])
    )
    cbp = with_flags(base, continual=("cbp", "noise"), batched_update="vmap")
    assert "--continual cbp noise: not in these batched runs" in "\n".join(
        batch_problems([cbp, with_flags(cbp, seed=2)])
    )
    concurrent = [with_flags(cbp, batched_update="concurrent", seed=seed) for seed in (1, 2)]
    assert batch_problems(concurrent) == []  # each run's own update: its hooks work
    concurrent_lifecycle = [with_flags(lifecycle, batched_update="concurrent", seed=seed) for seed in (1, 2)]
    assert "lifecycle" in "\n".join(batch_problems(concurrent_lifecycle))
    # auto: each run's own update on a CPU (faster there, and exactly the runs alone), vmap on CUDA
    assert update_mode_of(with_flags(base, device="cpu")) == "concurrent"
    assert update_mode_of(with_flags(base, device="cuda")) == "vmap"


def test_a_batch_whose_replays_do_not_fit_together_is_refused_before_any_work(drq):
    """Each run's replay fits alone (the per-run check passes), but the process holds one per run:
    the batch is refused with the total it needs and the number of runs, before anything is built."""
    from rlplastic.machine import memory_problem
    from rlplastic.replay import FrameReplay

    free = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemAvailable")).split()[1]) * 1024  # fmt: skip
    buffer_size = free // (3 * FrameReplay.memory_bytes(1))  # a third of the free memory each
    assert memory_problem(FrameReplay.memory_bytes(buffer_size), torch.device("cpu"), "one") is None
    runs = [with_flags(drq.Args(), device="cpu", buffer_size=buffer_size, seed=seed) for seed in (1, 2, 3, 4)]
    problems = batch_problems(runs)
    assert len(problems) == 1 and f"--buffer-size {buffer_size} (the replay) x 4 runs in one process" in problems[0]
    assert batch_problems(runs[:2]) == []  # two thirds fit


def test_a_batch_whose_replays_fit_but_not_with_its_networks_and_process_is_refused(drq):
    """32 DrQ runs of 100k-slot replays on this 24 GB machine: the replays alone (21 GiB) passed a
    check of the replays alone and the OS killed the process while it built them. The refusal
    counts each run's learner and the process too."""
    from rlplastic.replay import FrameReplay

    free = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemAvailable")).split()[1]) * 1024  # fmt: skip
    buffer_size = (free - 2**29) // (2 * FrameReplay.memory_bytes(1))  # two replays leave 0.5 GiB free
    assert 2 * FrameReplay.memory_bytes(buffer_size) < free
    runs = [with_flags(drq.Args(), device="cpu", buffer_size=buffer_size, seed=seed) for seed in (1, 2)]
    problems = batch_problems(runs)
    assert len(problems) == 1
    assert f"--buffer-size {buffer_size} (the replay) x 2 runs in one process with their networks" in problems[0]


TINY = ["--total-steps", "240", "--learning-starts", "80", "--buffer-size", "1000", "--batch-size", "8",
        "--log-every", "80", "--eval-episodes", "2", "--eval-envs", "2", "--max-episode-steps", "150",
        "--diag-every", "120", "--device", "cpu", "--ema", "0.99", "--reset", "hare-tortoise", "head",
        "--ht-every", "40", "--head-every", "70"]  # fmt: skip
METHOD = "drq+hare-tortoise+head"  # the method label of TINY's runs, which names their folders


def run_drq(argv, timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "agents" / "drq.py"), *argv], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


@pytest.mark.slow
def test_games_and_seeds_run_together_with_each_runs_files_and_numbers(drq, tmp_path):
    """The vmapped update (--batched-update vmap; auto picks it on CUDA): one batched forward and
    backward per stack, each run's numbers up to the order of float sums."""
    proc = run_drq(["--env-id", "Pong", "Boxing", "--seed", "1", "2", "--output-dir", str(tmp_path / "b"),
                    "--batched-update", "vmap", "--save-model", *TINY])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "update batched, 4 run(s)" in proc.stdout
    alone = run_drq(["--env-id", "Boxing", "--seed", "2", "--output-dir", str(tmp_path / "alone"),
                     "--batched-update", "vmap", "--save-model", *TINY])  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-3000:]
    single = json.loads((tmp_path / "alone" / "results.json").read_text())
    for game in ("Pong", "Boxing"):
        for seed in (1, 2):
            folder = tmp_path / "b" / METHOD / game / f"seed{seed}"  # OUT/{method}/{game}/seed{seed}
            results = json.loads((folder / "results.json").read_text())
            assert results["game"] == game and results["seed"] == seed and results["update_mode"] == "batched"
            assert len(results["eval_returns"]) == 2 and [d["step"] for d in results["diagnostics"]] == [120, 240]
            assert any(name.startswith("events.out.tfevents") for name in os.listdir(folder))
    together = json.loads((tmp_path / "b" / METHOD / "Boxing" / "seed2" / "results.json").read_text())
    assert together["config"] | {"output_dir": None} == single["config"] | {"output_dir": None}
    assert together["train_episodes"] == single["train_episodes"]  # the same run, up to float sums
    for row, single_row in zip(together["train_log"], single["train_log"], strict=True):
        assert row["td_loss"] == pytest.approx(single_row["td_loss"], rel=1e-2)
    # each run's saved network holds its own weights only, not its stack's (its parameters are views)
    size = (tmp_path / "b" / METHOD / "Boxing" / "seed2" / "q_network.pt").stat().st_size
    assert size == pytest.approx((tmp_path / "alone" / "q_network.pt").stat().st_size, rel=0.01)


class Killed(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("env_workers, mode", [(0, "vmap"), (2, "auto")])
def test_a_killed_batch_resumes_every_run_to_the_straight_numbers(
    drq_batched, drq, tmp_path, monkeypatch, env_workers, mode
):
    """Also with the environments in worker processes: their states travel through the checkpoint."""
    from rlplastic import runs

    def batch(folder):
        base = with_flags(drq.Args(), total_steps=160, learning_starts=60, buffer_size=1000, batch_size=8,
                          log_every=40, eval_episodes=1, eval_envs=1, max_episode_steps=100, diag_every=0,
                          checkpoint_every=80, device="cpu", track_tensorboard=False, reset=("redo",),
                          redo_every=20, redo_batch=16, env_workers=env_workers, batched_update=mode)  # fmt: skip
        return [with_flags(base, env_id="Pong", seed=seed, output_dir=str(tmp_path / folder / str(seed)))
                for seed in (1, 2)]  # fmt: skip

    straight = drq_batched.train(batch("straight"))
    real_save, saves = runs.save_checkpoint, []

    def save_then_die(*a):
        real_save(*a)
        saves.append(1)
        if len(saves) == 2:  # both runs' checkpoints at step 80 written
            raise Killed

    monkeypatch.setattr(runs, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        drq_batched.train(batch("resumed"))
    monkeypatch.setattr(runs, "save_checkpoint", real_save)
    resumed = drq_batched.train(batch("resumed"))
    for a, b in zip(straight, resumed, strict=True):
        for key in ("train_log", "train_episodes", "eval_returns"):
            assert a[key] == b[key]


@pytest.mark.slow
def test_environments_in_worker_processes_give_the_same_runs(drq_batched, drq, tmp_path):
    """--env-workers moves the runs' environments into processes stepped in parallel, and their
    final evaluations too: the same episodes, losses and evaluations as in the training process."""

    def batch(folder, workers):
        base = with_flags(drq.Args(), total_steps=200, learning_starts=60, buffer_size=1000, batch_size=8,
                          log_every=50, eval_episodes=3, eval_envs=2, eval_epsilon=0.3, max_episode_steps=80,
                          diag_every=0, checkpoint_every=100, device="cpu", track_tensorboard=False,
                          env_workers=workers)  # fmt: skip
        return [with_flags(base, env_id=game, seed=seed, output_dir=str(tmp_path / folder / f"{game}{seed}"))
                for game, seed in (("Pong", 1), ("Boxing", 1), ("Pong", 2))]  # fmt: skip

    here = drq_batched.train(batch("here", 0))
    workers = drq_batched.train(batch("workers", 2))
    for a, b in zip(here, workers, strict=True):
        for key in ("train_log", "train_episodes", "eval_returns"):
            assert a[key] == b[key]
    assert here[1]["train_episodes"], "Boxing's 80-step episodes end within the run"


@pytest.mark.slow
def test_concurrent_updates_give_each_run_exactly_its_single_run(drq_batched, drq, tmp_path):
    """--batched-update concurrent steps each run's own update (on CUDA: its own captured graph,
    replayed side by side on streams; on a CPU one after another): every number equals the run
    alone, continual backprop (which hooks the run's forward) and head resets included."""

    def args(folder, game, seed):
        return with_flags(drq.Args(), env_id=game, seed=seed, total_steps=200, learning_starts=60, buffer_size=1000,
                          batch_size=8, log_every=50, eval_episodes=1, eval_envs=1, max_episode_steps=80,
                          diag_every=0, checkpoint_every=0, device="cpu", track_tensorboard=False,
                          batched_update="concurrent", continual=("cbp",), cbp_rate=0.01, cbp_maturity=10,
                          reset=("head",), head_every=50,
                          output_dir=str(tmp_path / folder / f"{game}{seed}"))  # fmt: skip

    together = drq_batched.train([args("together", "Pong", 1), args("together", "Boxing", 2)])
    for (game, seed), result in zip((("Pong", 1), ("Boxing", 2)), together, strict=True):
        alone = drq_batched.train([args("alone", game, seed)])[0]
        assert result["update_mode"] == "batched-concurrent"
        for key in ("train_log", "train_episodes", "eval_returns"):
            assert result[key] == alone[key], (game, key)


@pytest.mark.slow
@pytest.mark.parametrize("noop_unit", ["agent-steps", "frames"])
def test_final_evaluations_of_several_runs_together_are_each_runs_own(noop_unit):
    """rlplastic.evaluation.evaluate_runs plays the evaluations of several runs at once, their
    environments in this process or in worker processes: each run's episodes (returns, lengths)
    are the ones evaluate_episodes plays for it alone, exploration draws included."""
    from rlplastic.envs.atari import make_atari100k_env

    from rlplastic.env_workers import EnvWorkers
    from rlplastic.evaluation import LocalEnvs, episode_quotas, evaluate_episodes, evaluate_runs

    games, seeds, episodes, envs_per_run, cap = ("Pong", "Boxing"), (10_001, 10_002), 3, 2, 60

    def policy(offset):  # greedy actions that depend on the observations
        return lambda obs: (obs.reshape(len(obs), -1).sum(1) + offset) % 3

    def make_env(game, seed):
        return make_atari100k_env(game, seed, max_episode_steps=cap, noop_unit=noop_unit)

    acts = [policy(0), policy(1)]
    alone = [evaluate_episodes(lambda s, g=game: make_env(g, s), act, episodes, envs_per_run, 0.3, seed)
             for game, act, seed in zip(games, acts, seeds, strict=True)]  # fmt: skip
    assert all(len(result.returns) == episodes for result in alone)
    per_run = len(episode_quotas(episodes, envs_per_run))
    specs = [(game, seed + i) for game, seed in zip(games, seeds, strict=True) for i in range(per_run)]
    local = LocalEnvs([make_env(game, seed) for game, seed in specs])
    workers = EnvWorkers(specs, processes=2, max_episode_steps=cap, noop_unit=noop_unit)
    try:
        for envs in (local, workers):
            together = evaluate_runs(envs, acts, episodes, envs_per_run, 0.3, seeds)
            assert [(r.returns, r.lengths) for r in together] == [(r.returns, r.lengths) for r in alone]
    finally:
        local.close(), workers.close()


@pytest.mark.parametrize("mode", ["concurrent", "vmap"])
def test_a_diverged_run_is_set_aside_and_the_others_of_its_batch_finish(drq_batched, drq, tmp_path, monkeypatch, mode):
    """One run of a batch whose loss turns NaN (from its 61st update, step 100; found at the report
    of step 120) writes diverged.json, keeps its last good checkpoint (step 80) and no results; the
    other run goes on to its results (concurrent: exactly its numbers alone) and the process exits
    non-zero naming the diverged run. A run alone still stops at once (test_drq)."""

    def args(seed, folder):
        return with_flags(drq.Args(), env_id="Pong", seed=seed, total_steps=200, learning_starts=40, batch_size=4,
                          eval_episodes=1, max_episode_steps=100, log_every=40, checkpoint_every=80, diag_every=0,
                          device="cpu", track_tensorboard=False, batched_update=mode,
                          output_dir=str(tmp_path / folder / str(seed)))  # fmt: skip

    real_update, real_batched, calls = drq.update, drq_batched.batched_update, []

    def diverging_update(args_, q_network, *rest, **kw):  # concurrent: each run's own update
        losses = real_update(args_, q_network, *rest, **kw)
        calls.append(q_network.value.bias.data_ptr())
        if calls.count(calls[-1]) > 60 and calls[-1] != calls[0]:  # the second run's network
            losses["td_loss"] = losses["td_loss"] * float("nan")
        return losses

    def diverging_batched(*a, **kw):  # vmap: one update for both runs, run 1's loss made NaN
        losses = real_batched(*a, **kw)
        calls.append(1)
        if len(calls) > 60:
            losses["td_loss"] = losses["td_loss"] * torch.tensor([1.0, float("nan")])
        return losses

    monkeypatch.setattr(drq, "update", diverging_update)
    monkeypatch.setattr(drq_batched, "batched_update", diverging_batched)
    with pytest.raises(SystemExit, match=r"drq: Pong seed 2 diverged \(.*diverged.json\); 1 other run\(s\) finished"):
        drq_batched.train([args(1, "batch"), args(2, "batch")])
    survivor, diverged = tmp_path / "batch" / "1", tmp_path / "batch" / "2"
    assert not (diverged / "results.json").exists() and (survivor / "results.json").exists()
    record = json.loads((diverged / "diverged.json").read_text())
    assert record["step"] == 120 and record["losses"]["td_loss"] == "nan"
    assert torch.load(diverged / "checkpoint.pt", weights_only=True)["step"] == 80  # the last good one
    results = json.loads((survivor / "results.json").read_text())
    assert all(row["td_loss"] == row["td_loss"] for row in results["train_log"])  # no NaN in the survivor
    assert results["eval_episodes"] == 1 and not (survivor / "checkpoint.pt").exists()
    if mode == "concurrent":  # on a CPU each run's own update: the survivor is exactly its run alone
        monkeypatch.setattr(drq, "update", real_update)
        alone = drq.main(args(1, "alone"))
        for key in ("train_log", "train_episodes", "eval_returns"):
            assert results[key] == alone[key]
