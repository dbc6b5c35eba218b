"""The run harness (rlplastic.runs.Run), the shared option dataclasses and the presets."""

import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import ROOT, with_flags

from rlplastic.cli import cli_with_presets
from rlplastic.files import atomic_torch_save
from rlplastic.interventions import InterventionOptions
from rlplastic.replay import FrameReplay
from rlplastic.runs import CHECKPOINT_FORMAT, DeviceMeans, Run, RunOptions, flat_config


@pytest.mark.parametrize("agent", ["drq", "bbf_agent"])
def test_every_preset_is_a_valid_configuration(agent, request):
    module = request.getfixturevalue(agent)
    assert module.PRESETS, "each agent names its configurations"
    for name, (text, args) in module.PRESETS.items():
        assert text and module.validate(args) == [], name


def test_a_preset_sets_defaults_that_flags_override(drq, bbf_agent):
    bbf = bbf_agent
    args = cli_with_presets(drq.Args, drq.PRESETS, None, ["hare-tortoise", "--env-id", "Pong"])
    assert args.env_id == "Pong" and args.updates_per_step == 2
    assert args.interventions.reset == ("hare-tortoise",) and args.interventions.ema == 0.995
    args = cli_with_presets(drq.Args, drq.PRESETS, None, ["hare-tortoise", "--ema", "0.99", "--ht-every", "2000"])
    assert args.interventions.ema == 0.99 and args.interventions.every("hare-tortoise") == 2000
    plain = cli_with_presets(drq.Args, drq.PRESETS, None, ["--env-id", "Pong"])
    assert plain.updates_per_step == 1 and plain.interventions.reset == ()
    rr8 = cli_with_presets(bbf.Args, bbf.PRESETS, None, ["bbf-rr8"])
    assert rr8.replay_ratio == 8 and bbf.reset_interval(rr8) == 5_000 and bbf.method_label(rr8) == "bbf-rr8"
    ht = cli_with_presets(bbf.Args, bbf.PRESETS, None, ["hare-tortoise"])
    assert ht.no_spr and bbf.method_label(ht) == "bbf+hare-tortoise-nospr"
    with pytest.raises(SystemExit, match="unknown preset 'rr9'; presets: bbf-rr2, bbf-rr8"):
        cli_with_presets(bbf.Args, bbf.PRESETS, None, ["rr9"])


def test_each_preset_plays_the_noop_starts_of_the_runner_it_follows(drq, bbf_agent):
    """drq-eps compares with Agarwal et al. 2021's released runs: dopamine's 2021 runner, noop frames;
    Hare & Tortoise and BBF follow the BBF-era runner: noop agent steps (as the plain default)."""
    units = {name: args.run.noop_unit for name, (_, args) in drq.PRESETS.items()}
    assert units == {"drq-eps": "frames", "hare-tortoise": "agent-steps", "cpu-smoke": "agent-steps"}
    assert {args.run.noop_unit for _, args in bbf_agent.PRESETS.values()} == {"agent-steps"}
    assert drq.Args().run.noop_unit == "agent-steps"
    parsed = cli_with_presets(drq.Args, drq.PRESETS, None, ["drq-eps", "--env-id", "Qbert", "--seed", "4"])
    assert parsed.run.noop_unit == "frames" and flat_config(parsed)["noop_unit"] == "frames"


def test_help_lists_the_presets_and_the_shared_flags():
    for agent, presets in (("drq", ["drq-eps", "hare-tortoise", "cpu-smoke"]),
                           ("bbf", ["bbf-rr2", "bbf-rr8", "hare-tortoise", "cpu-smoke"])):  # fmt: skip
        proc = subprocess.run([sys.executable, str(ROOT / "agents" / f"{agent}.py"), "--help"], capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0
        for text in [*presets, "--reset", "--continual", "--ema", "--reset-every", "--output-dir", "--save-model"]:
            assert text in proc.stdout, (agent, text)


def test_one_flag_name_and_unit_in_both_agents(drq, bbf_agent):
    bbf = bbf_agent
    """The same intervention options, in gradient steps, in both agents; non-resets are not --reset."""
    assert type(drq.Args().interventions) is type(bbf.Args().interventions) is InterventionOptions
    assert drq.Args().interventions.ema == 0.0 and bbf.Args().interventions.ema == 0.995  # BBF's tau 0.005
    options = InterventionOptions(reset=("hare-tortoise", "redo"), reset_every=500, redo_every=50, ema=0.9)
    assert options.every("hare-tortoise") == 500 and options.every("redo") == 50
    assert InterventionOptions().every("hare-tortoise") == 4_000 and InterventionOptions().every("head") == 20_000
    proc = subprocess.run([sys.executable, str(ROOT / "agents" / "drq.py"), "--reset", "noise"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "noise" in proc.stderr
    problems = "\n".join(bbf.validate(with_flags(bbf.Args(), reset=("head",), continual=("lifecycle",), ema=0.0)))
    assert "bbf does not support head, lifecycle" in problems and "bbf needs an EMA target" in problems


def test_run_config_is_flat_as_the_flags(drq):
    config = flat_config(with_flags(drq.Args(), reset=("redo",), eval_episodes=3))
    assert config["reset"] == ("redo",) and config["eval_episodes"] == 3 and config["n_step"] == 10
    assert "interventions" not in config and "run" not in config


def test_device_means_sum_in_place_and_resume():
    means = DeviceMeans()
    assert means.read() == {}
    for loss in (1.0, 3.0):
        means.add({"loss": torch.tensor(loss)})
        means.tick()
    total = means.sums["loss"]
    assert means.read() == {"loss": 2.0} and means.sums["loss"] is total and total.item() == 0  # zeroed in place
    means.add({"loss": torch.tensor(5.0)})
    means.tick()
    restored = DeviceMeans()
    restored.load_state_dict(means.state_dict())
    assert restored.read() == {"loss": 5.0}


def test_run_keeps_only_stateful_objects(drq, tmp_path):
    args = with_flags(drq.Args(), env_id="Pong", total_steps=10, device="cpu", output_dir=str(tmp_path / "r"),
                      track_tensorboard=False)  # fmt: skip
    run = Run("drq", args, [], "drq")
    with pytest.raises(TypeError, match="notes: a list has no state_dict"):
        run.keep(notes=[])
    with pytest.raises(SystemExit, match="invalid arguments:\n  --total-steps -1"):
        Run("drq", args, ["--total-steps -1: must be a positive integer"], "drq")


def test_an_old_format_checkpoint_is_refused_with_the_reason(drq, tmp_path):
    """Checkpoints written before the harness (each agent's own keys) cannot be resumed: said so."""
    run_dir = tmp_path / "run"
    args = with_flags(drq.Args(), env_id="Pong", total_steps=100, learning_starts=50, device="cpu",
                      output_dir=str(run_dir))  # fmt: skip
    old = {"step": 40, "config": flat_config(args), "q_network": {"w": torch.zeros(2)}, "obs": torch.zeros(3)}
    atomic_torch_save(run_dir / "checkpoint.pt", old)
    with pytest.raises(SystemExit) as exit_info:
        drq.main(args)
    message = str(exit_info.value)
    assert "checkpoint of format 1, written by an earlier rlplastic" in message
    assert f"this one reads format {CHECKPOINT_FORMAT} only (the layout changed with the run harness)" in message
    assert "start over in another --output-dir" in message
    assert not (run_dir / "results.json").exists()


@dataclass
class TinyArgs:
    """A third agent's arguments: what it chooses, plus the shared RunOptions."""

    env_id: str = "Pong"
    seed: int = 4
    total_steps: int = 120
    run: RunOptions = field(
        default_factory=lambda: RunOptions(device="cpu", eval_episodes=1, eval_envs=1, max_episode_steps=60,
                                           log_every=40, checkpoint_every=60, diag_every=0, track_tensorboard=False)
    )  # fmt: skip


def tiny_agent(args: TinyArgs) -> dict:
    """A whole (if simple) Atari agent on the harness: only its algorithm is written here."""
    run = Run("tiny", args, [], "tiny")
    env = run.make_env()
    net = nn.Sequential(nn.Flatten(), nn.Linear(4 * 84 * 84, int(env.action_space.n)))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    replay = FrameReplay(500, 3, 0.99, generator=run.generator)
    run.keep(net=net, optimizer=optimizer, replay=replay)
    saved = run.resume()
    obs = saved["obs"] if saved else env.reset()[0]

    def greedy(observations):
        with torch.no_grad():
            return net(torch.as_tensor(observations).float() / 255).argmax(1).numpy()

    for step in run.steps():
        action = int(run.rng.integers(env.action_space.n)) if run.rng.random() < 0.5 else int(greedy(obs[None])[0])
        if replay.num_sampleable > 0:
            batch = replay.sample(8)
            q = net(batch.states.float() / 255).gather(1, batch.actions[:, None]).squeeze(1)
            loss = (q - batch.returns).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.losses.add({"loss": loss.detach()})
            run.losses.tick()
        next_obs, reward, terminated, truncated, info = env.step(action)
        replay.add(obs[-1], action, reward, terminated or info["life_loss"], truncated)
        if terminated or truncated:
            run.episode(step, info)
            next_obs, _ = env.reset()
        obs = next_obs
        if run.report_due(step):
            run.report(step, {"epsilon": 0.5}, {})
        run.checkpoint(step, obs=obs)
    return run.finish(greedy, [net], {})


class Killed(Exception):
    pass


@pytest.mark.slow
def test_a_third_agent_needs_none_of_the_plumbing_rewritten(tmp_path, monkeypatch):
    """Folder, records, checkpoints, resume and results come from the harness: a run killed after
    its checkpoint resumes to the straight run's numbers."""
    from rlplastic import runs

    straight = tiny_agent(replace(TinyArgs(), run=replace(TinyArgs().run, output_dir=str(tmp_path / "straight"))))
    assert [row["step"] for row in straight["train_log"]] == [40, 80, 120] and len(straight["eval_returns"]) == 1
    assert straight["agent"] == "tiny" and straight["train_episodes"] and straight["config"]["env_id"] == "Pong"

    real_save = runs.save_checkpoint

    def save_then_die(*a):
        real_save(*a)
        raise Killed

    args = replace(TinyArgs(), run=replace(TinyArgs().run, output_dir=str(tmp_path / "resumed")))
    monkeypatch.setattr(runs, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        tiny_agent(args)
    monkeypatch.setattr(runs, "save_checkpoint", real_save)
    resumed = tiny_agent(args)
    for key in ("train_log", "train_episodes", "eval_returns"):
        assert resumed[key] == straight[key]
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists()


def test_git_commit_is_the_checkouts_or_the_one_a_copied_tree_was_given(monkeypatch):
    from rlplastic.machine import git_commit

    monkeypatch.delenv("RLPLASTIC_GIT_COMMIT", raising=False)
    here = git_commit(__file__)
    assert here is None or len(here.removesuffix("-dirty")) == 40  # None outside a git checkout
    monkeypatch.setenv("RLPLASTIC_GIT_COMMIT", "0123abc")  # a lent machine's copy: stale history
    assert git_commit(__file__) == "0123abc"


def test_the_eta_knows_random_play_from_learning(monkeypatch):
    """Random play runs 100x faster than learning here: its rate must not predict learning's (the
    recent-rate ETA was wrong by 10x and more around learning_starts); the ETA is unknown until a
    whole report window of learning has been timed."""
    import io

    from rlplastic import runs

    now = {"t": 0.0}
    monkeypatch.setattr(runs.time, "perf_counter", lambda: now["t"])
    out = io.StringIO()
    progress = runs.Progress(total=1000, every=100, learning_starts=300, stream=out)
    etas = {}
    for step, t in ((100, 0.1), (200, 0.2), (400, 10.2), (500, 20.2)):  # random 1000/s, learning 10/s
        now["t"] = t
        progress.report(step, progress.steps_per_second(step))
        etas[step] = progress.eta_seconds(step)
    assert etas[100] is etas[200] is etas[400] is None  # learning not timed yet
    assert etas[500] == pytest.approx(500 / 10.0)  # 10 steps/s while learning
    lines = out.getvalue().splitlines()
    assert "random play" in lines[0] and "eta ? (learning not timed yet)" in lines[0]
    assert "learning" in lines[3] and "eta 0.8m" in lines[3]


def test_an_evaluation_shows_its_progress_episode_by_episode():
    import io

    from rlplastic.envs.atari import make_atari100k_env

    from rlplastic.evaluation import evaluate_episodes
    from rlplastic.runs import EpisodeProgress

    out, calls = io.StringIO(), []
    progress = EpisodeProgress("drq: final evaluation", stream=out)

    def record(done: int, total: int) -> None:
        calls.append((done, total))
        progress(done, total)

    result = evaluate_episodes(lambda seed: make_atari100k_env("Pong", seed, max_episode_steps=10),
                               lambda obs: torch.zeros(len(obs), dtype=torch.long).numpy(), 20, 4, 0.0, seed=5,
                               progress=record)  # fmt: skip
    assert len(result.returns) == 20 and calls == [(k, 20) for k in range(1, 21)]
    assert out.getvalue().splitlines() == [f"drq: final evaluation: {k}/20 episodes" for k in range(2, 21, 2)]


def test_one_layout_of_run_folders_for_every_entry_point():
    from rlplastic import sweep
    from rlplastic.cli import expand_runs
    from rlplastic.runs import fill_output_dir, run_folder

    assert run_folder("out", "drq+head", "Pong", 3) == Path("out/drq+head/Pong/seed3")
    default = fill_output_dir(None, "drq", "Pong", 3)
    assert default.parent == Path("runs/drq/Pong") and default.name.startswith("seed3__")
    assert fill_output_dir("x/{method}/{game}/seed{seed}", "bbf", "Qbert", 4) == Path("x/bbf/Qbert/seed4")
    assert fill_output_dir("plain", "bbf", "Qbert", 4) == Path("plain")
    several = expand_runs(["--env-id", "Pong", "ALE/Boxing-v5", "--seed", "1", "--output-dir", "out"])
    assert {tuple(command[:2]) for command in several} == {("--output-dir", "out/{method}/{game}/seed{seed}")}
    spec = sweep.expand_grid("drq", ["Boxing"], [2], "sw")[0]
    assert spec.run_dir == run_folder("sw", "drq", "Boxing", 2)
