import csv
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from rlplastic import sweep
from rlplastic.sweep import SweepError

TINY = [
    "total_steps=160", "learning_starts=128", "eval_episodes=1", "eval_envs=1", "max_episode_steps=200",
    "buffer_size=500", "diag_every=0", "log_every=80", "device=cpu",
]  # fmt: skip


def test_seed_and_game_lists():
    assert sweep.parse_seeds("1-5") == [1, 2, 3, 4, 5]
    assert sweep.parse_seeds("1-3,8") == [1, 2, 3, 8]
    assert sweep.parse_seeds("7") == [7]
    assert sweep.parse_seeds("0,2147483647") == [0, 2147483647]
    for bad in ("5-1", "a", "1,1", "1-", "-1", "1,4294967296"):
        with pytest.raises(SweepError, match="--seeds"):
            sweep.parse_seeds(bad)
    with pytest.raises(SweepError, match=r"--seeds -1: a seed must be an integer in \[0, 2147483647\]"):
        sweep.parse_seeds("-1")


def test_a_diverged_run_is_not_run_again(tmp_path):
    """A run that diverged (its diverged.json, written by the agent) would diverge again on resume:
    the sweep lists it and leaves it, and says so with a non-zero exit when nothing else is left."""
    out = tmp_path / "sweep"
    base = ["sweep", "--agent", "drq", "--games", "Pong", "--seeds", "1-2", "--out", str(out)]
    (out / "drq" / "Pong" / "seed2").mkdir(parents=True)
    (out / "drq" / "Pong" / "seed2" / "diverged.json").write_text('{"step": 120}')
    dry = sweep_cli(*base, "--dry-run")
    assert dry.returncode == 0 and "0 finished (skipped), 1 diverged (skipped), 0 to restart, 1 new" in dry.stdout
    assert "diverged before: drq Pong seed 2" in dry.stdout and "delete that file to retry it" in dry.stdout
    (out / "drq" / "Pong" / "seed1").mkdir(parents=True)
    finished = {"config": sweep.result_settings(sweep.load_agent("drq").Args())}  # a run of these settings
    (out / "drq" / "Pong" / "seed1" / "results.json").write_text(json.dumps(finished))
    nothing = sweep_cli(*base)
    assert nothing.returncode == 1 and "nothing to run" in nothing.stdout and "1 diverged" in nothing.stdout
    assert not (out / "drq" / "Pong" / "seed2" / "log.txt").exists()  # never launched


def test_a_finished_run_of_other_settings_is_refused_by_name_never_skipped(tmp_path):
    """--set learning-rate=... keeps the method label drq, so its runs' folders are those of a
    finished default sweep: the sweep refuses, naming the setting that differs, before any run."""
    out = tmp_path / "sweep"
    folder = out / "drq" / "Pong" / "seed1"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"config": sweep.result_settings(sweep.load_agent("drq").Args())}))
    base = ["sweep", "--agent", "drq", "--games", "Pong", "--seeds", "1", "--out", str(out)]
    assert "1 finished (skipped)" in sweep_cli(*base, "--dry-run").stdout  # the same settings: finished
    for command in ([*base, "--set", "learning-rate=0.001", "--dry-run"], [*base, "--set", "learning-rate=0.001"]):
        proc = sweep_cli(*command)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        differs = "holds a finished run of other settings (learning_rate: 0.0001 there, 0.001 here)"
        assert f"{folder} {differs}" in proc.stderr
        assert "--set exp_name=NAME" in proc.stderr
    assert not (folder / "log.txt").exists()  # nothing launched
    labelled = sweep_cli(*base, "--set", "learning-rate=0.001", "--set", "exp_name=lr1e-3", "--dry-run")
    assert labelled.returncode == 0 and "1 new" in labelled.stdout


def test_a_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "sweep"
    proc = sweep_cli("sweep", "--agent", "drq", "--games", "Pong", "--seeds", "1-2", "--out", str(out), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "2 new" in proc.stdout and "--seed 2" in proc.stdout
    assert not out.exists()
    assert len(sweep.parse_games("all")) == 26
    assert sweep.parse_games("pong,ALE/Breakout-v5") == ["Pong", "Breakout"]
    with pytest.raises(SweepError, match="unknown Atari-100k game 'Tetris'"):
        sweep.parse_games("Pong,Tetris")


def test_settings_become_agent_flags():
    assert sweep.flag_args("reset", "hare-tortoise redo") == ["--reset", "hare-tortoise", "redo"]
    assert sweep.flag_args("learning_rate", "3e-4") == ["--learning-rate", "3e-4"]
    assert sweep.flag_args("augment", "false") == ["--no-augment"]
    assert sweep.flag_args("lifecycle", "true") == ["--lifecycle"]
    assert sweep.flag_args("reset", "") == []


def test_grid_names_runs_by_method_label(tmp_path):
    specs = sweep.expand_grid("drq", ["Pong"], [1, 2], tmp_path, settings=["ema=0.995"], grid=["reset=,hare-tortoise"])
    assert [(s.method, s.seed) for s in specs] == [("drq", 1), ("drq", 2), ("drq+hare-tortoise", 1),
                                                    ("drq+hare-tortoise", 2)]  # fmt: skip
    assert specs[3].run_dir == tmp_path / "drq+hare-tortoise" / "Pong" / "seed2"
    command = specs[3].command()
    assert command[command.index("--reset") + 1] == "hare-tortoise"
    assert command[-6:] == ["--env-id", "Pong", "--seed", "2", "--output-dir", str(specs[3].run_dir)]
    # a grid over an argument the label does not show names it
    lr = sweep.expand_grid("drq", ["Pong"], [1], tmp_path, grid=["learning_rate=1e-4,3e-4"])
    assert [s.method for s in lr] == ["drq@learning_rate=1e-4", "drq@learning_rate=3e-4"]


@pytest.mark.parametrize(
    ("settings", "grid", "message"),
    [
        (["reset=hare-tortoise"], [], "needs --ema"),  # the agent's own validation, before any launch
        (["learning_rate=-1"], [], "--learning-rate -1"),
        (["seed=3"], [], "set by the sweep itself"),
        (["ema"], [], "expected KEY=VALUE"),
        (["ema=0.995"], ["ema=0.99,0.995"], "ema given more than once"),
        (["exp_name=mine"], ["reset=,head"], "both get the method label 'mine'"),
        (["no_such_flag=3"], [], "rejected"),
    ],
)
def test_bad_sweeps_fail_before_any_run(tmp_path, settings, grid, message):
    with pytest.raises(SweepError, match=message):
        sweep.expand_grid("drq", ["Pong"], [1], tmp_path / "out", settings=settings, grid=grid)
    assert not (tmp_path / "out").exists()


def test_unknown_agent_and_a_file_that_breaks_the_agent_contract(tmp_path, monkeypatch):
    from rlplastic import agent_files

    with pytest.raises(agent_files.AgentError, match="unknown agent 'dqn'; allowed: .*drq"):
        sweep.agent_path("dqn")
    assert agent_files.contract_problems(sweep.load_agent("drq")) == []
    assert agent_files.contract_problems(sweep.load_agent("bbf")) == []
    (tmp_path / "half.py").write_text("from dataclasses import dataclass\n@dataclass\nclass Args:\n    seed: int = 1\n"
                                      "def main(args):\n    return {}\n")  # fmt: skip
    monkeypatch.setattr(agent_files, "AGENTS_DIR", tmp_path)
    with pytest.raises(agent_files.AgentError, match=r"agents/half.py is not an agent sweeps can run: it lacks "
                       r"PRESETS \(named settings.*validate.*method_label.*Args.env_id, Args.run$"):  # fmt: skip
        agent_files.load_agent("half")
    proc = sweep_cli("sweep", "--agent", "drq_batched", "--games", "Pong", "--seeds", "1", "--out",
                     str(tmp_path / "s"), "--dry-run")  # fmt: skip
    assert proc.returncode != 0 and "agents/drq_batched.py is not an agent sweeps can run" in proc.stderr


def fake_slurm(tmp_path):
    """srun and sbatch stand-ins: sbatch keeps the submission file it is given and answers as slurm does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n')
    for name in ("srun", "sbatch"):
        (bin_dir / name).chmod(0o755 | stat.S_IEXEC)
    return bin_dir


def test_slurm_launcher_submits_one_job_array(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{fake_slurm(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    specs = sweep.expand_grid("drq", ["Pong", "Breakout"], [1, 2], tmp_path / "runs", settings=TINY)
    executor = sweep.slurm_executor(tmp_path / "slurm", partition="gpu", time_min=90, gpus_per_task=1,
                                    cpus_per_task=6, mem_gb=20, array_parallelism=3)  # fmt: skip
    assert sweep.run_slurm(specs, executor, wait=False) == []
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("#SBATCH --array=0-3%3", "#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=6", "#SBATCH --mem=20GB"):  # fmt: skip
        assert line in script


class PickleFreeJobs:
    """A stand-in slurm executor: map_array runs each task at once, except those named in `killed`
    (a job slurm ended before its run did); the jobs' result() fails the test if called, since the
    launcher must not unpickle submitit's result files."""

    def __init__(self, folder, killed=()):
        self.folder, self.killed = folder, set(killed)

    def map_array(self, fn, commands, logs):
        jobs = []
        for index, (command, log) in enumerate(zip(commands, logs, strict=True)):
            if index not in self.killed:
                fn(command, log)
            jobs.append(self.Job(f"77_{index}"))
        return jobs

    class Job:
        def __init__(self, job_id):
            self.job_id = job_id

        def wait(self):
            pass

        def result(self):
            raise AssertionError("the launcher read a job's result pickle")


def test_a_waiting_slurm_sweep_reads_return_codes_from_plain_text_not_pickles(tmp_path, monkeypatch):
    specs = sweep.expand_grid("drq", ["Pong", "Breakout", "Boxing"], [1], tmp_path / "runs", settings=TINY)
    codes = {"Pong": 0, "Breakout": 3, "Boxing": 0}
    monkeypatch.setattr(sweep.RunSpec, "command", lambda self: [sys.executable, "-c", f"exit({codes[self.game]})"])
    stale = sweep.exit_code_path(specs[2].log_path)
    stale.parent.mkdir(parents=True)
    stale.write_text("0\n")  # an earlier job's: it must not stand for the killed one
    stream = tmp_path / "stream.txt"
    with stream.open("w") as out:
        outcomes = sweep.run_slurm(specs, PickleFreeJobs(tmp_path / "slurm", killed={2}), wait=True, stream=out)
    assert [o.returncode for o in outcomes] == [0, 3, -1]
    assert sweep.exit_code_path(specs[1].log_path).read_text() == "3\n"
    assert "job 77_2 ended without a return code" in stream.read_text()
    assert sweep.read_exit_code(tmp_path / "nowhere.txt") is None


def sweep_cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "atari100k.py"), *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_local_sweep_then_report_then_rerun(tmp_path):
    out = tmp_path / "sweep"
    sets = [a for s in TINY for a in ("--set", s)]
    args = ["sweep", "--agent", "drq", "--games", "Pong,Breakout", "--seeds", "1-2", *sets, "--out", str(out)]
    first = sweep_cli(*args, "--workers", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "4 new" in first.stdout and "4 run(s) finished, 0 failed" in first.stdout
    results = sorted(out.rglob("results.json"))
    assert [p.relative_to(out).as_posix() for p in results] == [
        "drq/Breakout/seed1/results.json", "drq/Breakout/seed2/results.json",
        "drq/Pong/seed1/results.json", "drq/Pong/seed2/results.json",
    ]  # fmt: skip
    assert json.loads((out / "sweep.json").read_text())["runs"][0]["game"] == "Pong"

    refused = sweep_cli("report", str(out), "--out", str(tmp_path / "refused"))
    assert refused.returncode == 2 and "not full Atari-100k runs" in refused.stderr  # 160-step runs
    report = sweep_cli(
        "report", str(out), "--allow-short", "--reps", "200", "--profile-reps", "20", "--out", str(tmp_path / "rep")
    )
    assert report.returncode == 0, report.stderr
    assert "| drq [smoke] | 2 | 2 |" in report.stdout  # 2 runs per game, 2 games, marked as smoke runs
    rows = list(csv.DictReader(open(tmp_path / "rep" / "scores.csv")))
    by_run = {(r["game"], r["seed"]): float(r["score"]) for r in rows}
    assert by_run[("Pong", "1")] == json.loads((out / "drq/Pong/seed1/results.json").read_text())["eval_mean"]
    assert (tmp_path / "rep" / "aggregates.png").stat().st_size > 0

    mtimes = [p.stat().st_mtime_ns for p in results]
    again = sweep_cli(*args)
    assert again.returncode == 0 and "4 finished (skipped)" in again.stdout
    assert [p.stat().st_mtime_ns for p in results] == mtimes

    # an interrupted run restarts; a run that breaks is reported with its log and the others go on
    (out / "drq/Pong/seed1/results.json").unlink()
    (out / "drq/Breakout/seed2/results.json").unlink()
    (out / "drq/Breakout/seed2/checkpoint.pt").write_bytes(b"not a checkpoint")
    third = sweep_cli(*args, "--launcher", "slurm", "--submitit-cluster", "local", "--wait")
    assert third.returncode == 1
    assert "2 finished (skipped), 0 diverged (skipped), 2 to restart, 0 new" in third.stdout
    assert f"FAILED drq Breakout seed 2 (exit 1): {out / 'drq/Breakout/seed2/log.txt'}" in third.stdout
    assert (out / "drq/Pong/seed1/results.json").exists()
    assert "checkpoint" in (out / "drq/Breakout/seed2/log.txt").read_text()


def test_local_workers_take_gpus_in_turn_and_share_the_cores(tmp_path, monkeypatch):
    specs = sweep.expand_grid("drq", ["Pong", "Breakout"], [1, 2], tmp_path, settings=TINY)
    probe = "import os; print('gpu', os.environ['CUDA_VISIBLE_DEVICES'], 'threads', os.environ['OMP_NUM_THREADS'])"
    monkeypatch.setattr(sweep.RunSpec, "command", lambda self: [sys.executable, "-c", probe])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    outcomes = sweep.run_local(specs, workers=2, gpus=["3", "5"], stream=open(os.devnull, "w"))
    assert len(outcomes) == 4 and all(o.returncode == 0 and not o.ok for o in outcomes)  # no results.json
    lines = [s.log_path.read_text().splitlines()[-1] for s in specs]
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert set(lines) == {f"gpu 3 threads {threads}", f"gpu 5 threads {threads}"}


@pytest.mark.slow
def test_a_slurm_sweep_run_again_never_resubmits_queued_or_running_jobs(tmp_path, monkeypatch):
    """Job ids go to <sweep>/jobs.json; the next run of the sweep asks slurm (sacct, through
    submitit) and submits again only the runs whose job ended without results, naming their logs."""
    bin_dir = fake_slurm(tmp_path)
    sacct = bin_dir / "sacct"
    sacct.write_text("#!/bin/sh\nprintf 'JobID|State|NodeList\\n4242_0|RUNNING|n1\\n4242_1|PENDING|\\n"
                     "4242_2|FAILED|n2\\n4242_3|TIMEOUT|n3\\n'\n")  # fmt: skip
    sacct.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "sweep"
    args = ["sweep", "--agent", "drq", "--games", "Pong,Breakout", "--seeds", "0,1", "--out", str(out),
            "--launcher", "slurm", "--set", "total-steps=300", "--set", "learning-starts=100"]  # fmt: skip
    first = sweep_cli(*args)
    assert first.returncode == 0, first.stderr
    jobs = json.loads((out / "jobs.json").read_text())
    assert sorted(j["job_id"] for j in jobs.values()) == ["4242_0", "4242_1", "4242_2", "4242_3"]
    (tmp_path / "submitted.sh").unlink()
    second = sweep_cli(*args)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("not submitted again") == 2 and second.stdout.count("failed before") == 2
    assert "4242_0 RUNNING" in second.stdout and "4242_1 PENDING" in second.stdout
    assert "#SBATCH --array=0-1" in (tmp_path / "submitted.sh").read_text()  # the two failed runs only
    assert all("log.txt" in line for line in second.stdout.splitlines() if "failed before" in line)
    (out / "jobs.json").write_text("{oops")
    broken = sweep_cli(*args)
    assert broken.returncode != 0 and "jobs.json is not this sweep's job record" in broken.stderr
    assert "Traceback" not in broken.stderr


def test_runs_pack_into_processes_as_products_of_games_and_seeds(tmp_path):
    specs = sweep.expand_grid("drq", ["Pong", "Boxing", "Breakout"], [1, 2], tmp_path, grid=["reset=,redo"])
    packs = sweep.pack_specs(specs, 4)
    assert sorted(len(p) for p in packs) == [2, 2, 4, 4]  # per method: 2 games x 2 seeds, then 1 x 2
    assert len({s for p in packs for s in p}) == 12  # every run once
    first = next(p for p in packs if len(p) == 4 and p[0].method == "drq")
    command = sweep.pack_command(first)
    assert command[command.index("--env-id") + 1 : command.index("--seed")] == ["Pong", "Boxing"]
    assert command[command.index("--seed") + 1 : command.index("--output-dir")] == ["1", "2"]
    # the agent's command line turns the pack back into the runs, each in its own sweep folder
    from rlplastic.cli import expand_runs
    from rlplastic.runs import fill_output_dir

    def folder(argv: list[str]) -> Path:  # as each run fills its --output-dir in
        value = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
        return fill_output_dir(value("--output-dir"), "drq", value("--env-id"), int(value("--seed")))

    assert [folder(argv) for argv in expand_runs(command[2:])] == [s.run_dir for s in first]
    (first[0].run_dir).mkdir(parents=True)  # an interrupted run packs apart from the new ones
    assert sorted(len(p) for p in sweep.pack_specs(specs, 4)) == [1, 1, 2, 4, 4]
    with pytest.raises(sweep.SweepError, match="only drq runs several"):
        sweep.pack_specs(sweep.expand_grid("bbf", ["Pong"], [1, 2], tmp_path), 2)
    assert sweep.pack_specs(specs, 1) == [(s,) for s in specs]


@pytest.mark.slow
def test_a_packed_sweep_runs_each_pack_in_one_process_into_the_usual_folders(tmp_path):
    out = tmp_path / "sweep"
    sets = [a for s in TINY for a in ("--set", s)]
    done = sweep_cli("sweep", "--agent", "drq", "--games", "Pong,Breakout", "--seeds", "1-2", *sets, "--out", str(out),
                     "--pack", "4")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 run(s) finished, 0 failed" in done.stdout
    assert len(sorted(out.rglob("results.json"))) == 4 and (out / "drq" / "pack_Pong-Breakout_seeds1-2.log").exists()
    results = json.loads((out / "drq" / "Breakout" / "seed2" / "results.json").read_text())
    assert results["update_mode"] == "batched-concurrent" and results["method"] == "drq"  # auto, on a CPU
    again = sweep_cli("sweep", "--agent", "drq", "--games", "Pong,Breakout", "--seeds", "1-2", *sets, "--out", str(out),
                      "--pack", "4")  # fmt: skip
    assert "4 finished (skipped)" in again.stdout and "every run is finished" in again.stdout
