"""What the run harness promises: one writer per folder, checkpoints that survive a failed write,
refusals before any work for what cannot fit, and clean messages for bad input on every CLI."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

from rlplastic import checkpoints, files, machine, runs


def test_a_second_process_is_refused_with_the_holders_pid_and_a_killed_holder_frees_the_folder(tmp_path):
    folder = tmp_path / "run"
    code = (
        "import sys, time; from pathlib import Path; from rlplastic.checkpoints import hold_run_folder; "
        f"hold_run_folder(Path({str(folder)!r}), 'drq'); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert second.returncode != 0 and f"in use by a live run (PID {holder.pid})" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    checkpoints.hold_run_folder(folder, "drq")  # the OS dropped the dead holder's lock: resumable at once
    checkpoints.hold_run_folder(folder, "drq")  # and re-entrant within one process
    assert (folder / ".lock").read_text() == str(os.getpid())


def test_a_checkpoint_from_before_an_argument_existed_resumes_only_under_its_old_meaning(tmp_path):
    """A run checkpointed before --noop-unit existed played agent-step noops: it resumes under that
    value and is refused under the other, like any changed argument."""
    path = tmp_path / "checkpoint.pt"
    old_config = {"env_id": "Pong", "seed": 1}
    saved = {"format": checkpoints.CHECKPOINT_FORMAT, "step": 10, "config": old_config}
    checkpoints.save_checkpoint(path, saved, "drq")
    config = {**old_config, "noop_unit": "agent-steps"}
    assert checkpoints.load_checkpoint(path, config, set(), torch.device("cpu"), "drq")["step"] == 10
    with pytest.raises(SystemExit, match=r"other arguments \(noop_unit\)"):
        checkpoints.load_checkpoint(path, {**config, "noop_unit": "frames"}, set(), torch.device("cpu"), "drq")
    with pytest.raises(SystemExit, match=r"other arguments \(new_flag\)"):  # any other missing key still differs
        checkpoints.load_checkpoint(path, {**config, "new_flag": 1}, set(), torch.device("cpu"), "drq")


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_stops_with_a_message(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoints.save_checkpoint(path, {"step": 1, "weights": torch.ones(3)}, "drq")
    real_save = torch.save

    def disk_full(obj, f):
        real_save({"half": torch.zeros(1000)}, f)  # part of the bytes reach the disk, then it fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit, match="No space left on device.*previous checkpoint .* is kept"):
        checkpoints.save_checkpoint(path, {"step": 2, "weights": torch.zeros(3)}, "drq")
    monkeypatch.setattr(torch, "save", real_save)
    assert files.safe_torch_load(path)["step"] == 1  # intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_output_dir_problems_and_memory_refusals(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert "is a file, not a folder" in checkpoints.output_dir_problems(str(a_file))[0]
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text("{}")
    assert "already holds a finished run" in checkpoints.output_dir_problems(str(tmp_path / "done"))[0]
    assert checkpoints.output_dir_problems(str(tmp_path / "new")) == [] and checkpoints.output_dir_problems(None) == []
    message = machine.memory_problem(1 << 60, torch.device("cpu"), "--buffer-size 10**14 (the replay)")
    assert message.startswith("--buffer-size 10**14 (the replay) needs 1073741824.00 GiB but cpu has")
    assert machine.memory_problem(1024, torch.device("cpu"), "tiny") is None


def test_to_plain_turns_string_subclasses_into_plain_strings(tmp_path):
    files.atomic_torch_save(tmp_path / "v.pt", {"torch_version": torch.__version__})
    assert files.safe_torch_load(tmp_path / "v.pt")["torch_version"] == str(torch.__version__)


def test_files_written_atomically_get_the_permissions_of_any_new_file(tmp_path):
    """Results, reports and checkpoints are readable by whoever may read a file the user creates
    (mkstemp alone makes them owner-only)."""
    (tmp_path / "plain.txt").write_text("x")
    files.atomic_write_json(tmp_path / "results.json", {"a": 1})
    files.atomic_torch_save(tmp_path / "checkpoint.pt", {"w": torch.ones(2)})
    expected = (tmp_path / "plain.txt").stat().st_mode & 0o777
    for name in ("results.json", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def test_a_view_is_saved_as_its_own_values_not_its_whole_storage(tmp_path):
    """A batched run's parameters are views of every run's stacked tensors; torch.save alone would
    write the whole storage into each run's checkpoint."""
    stacked = torch.randn(8, 1000)
    files.atomic_torch_save(tmp_path / "alone.pt", {"w": stacked[3].clone()})
    files.atomic_torch_save(tmp_path / "view.pt", {"w": stacked[3], "rows": stacked[:2]})
    loaded = files.safe_torch_load(tmp_path / "view.pt")
    assert torch.equal(loaded["w"], stacked[3]) and torch.equal(loaded["rows"], stacked[:2])
    assert (tmp_path / "view.pt").stat().st_size < 4 * (tmp_path / "alone.pt").stat().st_size


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def bad_inputs(tmp_path):
    """(name, command) pairs a new user might type; each must fail with one clear message."""
    drq, bbf = str(ROOT / "agents" / "drq.py"), str(ROOT / "agents" / "bbf.py")
    sup, a100k = str(ROOT / "scripts" / "supervised.py"), str(ROOT / "scripts" / "atari100k.py")
    sg, cl = str(ROOT / "scripts" / "stability_gap.py"), str(ROOT / "scripts" / "cloning.py")
    ev, bf = str(ROOT / "scripts" / "drq_evaluate.py"), str(ROOT / "scripts" / "bitflip.py")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    corrupt_dir = tmp_path / "corrupt"
    corrupt_dir.mkdir()
    (corrupt_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04garbage-not-a-checkpoint")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"dataset": "mnist1d"}\n{oops\n')
    foreign_jsonl = tmp_path / "foreign.jsonl"
    foreign_jsonl.write_text('{"hello": 1}\n')
    bad_scores = tmp_path / "runs_bad"
    (bad_scores / "Pong__drq__0").mkdir(parents=True)
    (bad_scores / "Pong__drq__0" / "results.json").write_text('{"game": "Pong", "eval_mean": ')
    not_weights = tmp_path / "q.pt"
    not_weights.write_bytes(b"\x80\x04not a torch file")
    out = str(tmp_path / "out")
    return [
        ("drq unknown game", [drq, "--env-id", "Tetris", "--output-dir", out]),
        ("drq negative steps", [drq, "--total-steps", "-5", "--output-dir", out]),
        ("drq output-dir is a file", [drq, "--output-dir", str(a_file)]),
        (
            "drq corrupt checkpoint",
            [
                drq,
                "--total-steps",
                "100",
                "--learning-starts",
                "50",
                "--output-dir",
                str(corrupt_dir),
                "--device",
                "cpu",
            ],
        ),  # fmt: skip
        ("drq batch larger than replay", [drq, "--batch-size", "64", "--buffer-size", "32", "--output-dir", out]),
        ("drq replay larger than memory", [drq, "--buffer-size", "100000000000", "--output-dir", out]),
        ("drq unknown reset", [drq, "--reset", "magic", "--output-dir", out]),
        ("drq not a number", [drq, "--learning-rate", "fast", "--output-dir", out]),
        ("drq no cuda", [drq, "--device", "cuda", "--output-dir", out]) if not torch.cuda.is_available() else None,
        ("bbf unknown game", [bbf, "--env-id", "Tetris", "--output-dir", out]),
        ("bbf output-dir is a file", [bbf, "--output-dir", str(a_file)]),
        ("bbf corrupt checkpoint", [bbf, "--total-steps", "100", "--output-dir", str(corrupt_dir), "--device", "cpu"]),
        ("supervised unknown method", [sup, "run", "--method", "magic", "--out", str(tmp_path / "o.jsonl")]),
        ("supervised bad subset", [sup, "run", "--subset", "0", "--out", str(tmp_path / "o.jsonl")]),
        (
            "supervised missing data",
            [
                sup,
                "run",
                "--dataset",
                "cifar10",
                "--data-dir",
                str(tmp_path),
                "--model",
                "resnet18",
                "--out",
                str(tmp_path / "o.jsonl"),
            ],
        ),  # fmt: skip
        ("supervised out is a folder", [sup, "run", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path)]),
        (
            "supervised batch larger than data",
            [sup, "run", "--dataset", "digits", "--batch-size", "100000", "--out", str(tmp_path / "o.jsonl")],
        ),  # fmt: skip
        (
            "supervised lifecycle fc on resnet",
            [
                sup,
                "run",
                "--model",
                "resnet18",
                "--dataset",
                "digits",
                "--method",
                "lifecycle",
                "--out",
                str(tmp_path / "o.jsonl"),
            ],
        ),
        ("table malformed line", [sup, "table", str(bad_jsonl)]),
        ("table foreign lines", [sup, "table", str(foreign_jsonl)]),
        ("table missing file", [sup, "table", str(tmp_path / "nope.jsonl")]),
        ("report truncated results.json", [a100k, "report", str(bad_scores), "--allow-short"]),
        ("report missing folder", [a100k, "report", str(tmp_path / "nope")]),
        (
            "sweep unknown agent",
            [a100k, "sweep", "--agent", "dqn", "--games", "Pong", "--seeds", "0", "--out", str(tmp_path / "sw")],
        ),  # fmt: skip
        ("stability gap unknown method", [sg, "--methods", "magic", "--out", str(tmp_path / "sg")]),
        ("cloning bad factor", [cl, "--config.factor", "1", "--out", str(tmp_path / "cl")]),
        ("evaluate not a weights file", [ev, str(not_weights), "--env-id", "Pong"]),
        # folders that cannot be made (a file in the way): refused before any work, never after it
        ("drq output-dir under a file", [drq, "--output-dir", str(a_file / "run")]),
        ("bbf output-dir under a file", [bbf, "--output-dir", str(a_file / "run")]),
        ("drq negative seed", [drq, "--seed", "-1", "--output-dir", out]),
        (
            "supervised tb-dir under a file",
            [sup, "run", "--dataset", "digits", "--tb-dir", str(a_file / "tb"), "--out", str(tmp_path / "o.jsonl")],
        ),  # fmt: skip
        ("supervised out under a file", [sup, "run", "--dataset", "digits", "--out", str(a_file / "o.jsonl")]),
        ("supervised negative seed", [sup, "run", "--seed", "-2", "--out", str(tmp_path / "o.jsonl")]),
        (
            "report out under a file",
            [a100k, "report", str(ROOT / "results" / "drq_eps_100k"), "--out", str(a_file / "r")],
        ),  # fmt: skip
        (
            "sweep out under a file",
            [a100k, "sweep", "--agent", "drq", "--games", "Pong", "--seeds", "1", "--out", str(a_file / "sw")],
        ),  # fmt: skip
        (
            "sweep negative seed",
            [a100k, "sweep", "--agent", "drq", "--games", "Pong", "--seeds", "-1", "--out", str(tmp_path / "sw")],
        ),  # fmt: skip
        ("stability gap out under a file", [sg, "--out", str(a_file / "sg")]),
        ("cloning out under a file", [cl, "--out", str(a_file / "cl")]),
        ("bitflip out under a file", [bf, "--out", str(a_file / "bf")]),
    ]


@pytest.mark.slow
def test_every_cli_answers_bad_input_with_one_clear_line_and_no_traceback(tmp_path):
    cases = [case for case in bad_inputs(tmp_path) if case is not None]
    failures = []
    for name, command in cases:
        done = _cli(*command)
        if done.returncode == 0 or "Traceback" in done.stderr or not done.stderr.strip():
            failures.append(f"{name}: rc {done.returncode}, stderr {done.stderr[-400:]!r}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "out").exists() and not (tmp_path / "sw").exists()  # nothing was started
    print(f"{len(cases)} bad inputs, each refused with a message")


KILL_RUN = [
    "--env-id", "Breakout", "--seed", "7", "--total-steps", "400", "--learning-starts", "100", "--batch-size", "8",
    "--buffer-size", "1000", "--eval-episodes", "1", "--max-episode-steps", "150", "--log-every", "100",
    "--checkpoint-every", "25", "--diag-every", "100", "--device", "cpu", "--reset", "hare-tortoise", "--ema", "0.99",
    "--ht-every", "60",
]  # fmt: skip


@pytest.mark.slow
def test_a_run_killed_at_random_moments_resumes_to_the_uninterrupted_results(tmp_path):
    """kill -9 at 12 random moments (checkpoints every 25 steps, so some land mid-write), the same
    command again each time: the results equal an uninterrupted run's exactly."""
    import random

    drq = str(ROOT / "agents" / "drq.py")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    straight_dir = tmp_path / "straight"
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, drq, *KILL_RUN, "--output-dir", str(straight_dir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)  # fmt: skip
    while not (straight_dir / "checkpoint.pt").exists() and process.poll() is None:
        time.sleep(0.05)
    startup = time.perf_counter() - started  # imports, emulator, first 25 steps
    assert process.wait() == 0, process.stderr.read()[-2000:]
    training = time.perf_counter() - started - startup
    straight = json.loads((straight_dir / "results.json").read_text())
    # Kill moments from the middle of the start-up (nothing saved yet) to an eighth of the training in:
    # each life gains little, so the run is killed many times before it can finish.
    chooser = random.Random(0)
    kills = 0
    folder = tmp_path / "killed"
    while kills < 12:
        process = subprocess.Popen([sys.executable, drq, *KILL_RUN, "--output-dir", str(folder)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)  # fmt: skip
        try:
            process.wait(timeout=chooser.uniform(0.5 * startup, startup + training / 8))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            continue
        assert process.returncode == 0, process.stderr.read()[-2000:]  # finished before its kill
        break
    if not (folder / "results.json").exists():
        done = subprocess.run([sys.executable, drq, *KILL_RUN, "--output-dir", str(folder)], capture_output=True,
                              text=True, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads((folder / "results.json").read_text())
    for key in ("eval_returns", "train_episodes", "train_log", "diagnostics"):
        assert resumed[key] == straight[key], key
    assert kills >= 10
    print(f"{kills} kills survived, 0 results differed")


def test_track_logs_to_weights_and_biases_as_cleanrl_does_and_is_refused_without_wandb(tmp_path, monkeypatch):
    import importlib.util
    import types

    calls = []
    fake = types.SimpleNamespace(init=lambda **kwargs: calls.append(kwargs))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    runs.start_tracking("proj", None, tmp_path / "Pong__drq__1", "Pong__drq__1", {"seed": 1})
    assert calls[0]["sync_tensorboard"] is True and calls[0]["id"] == "Pong__drq__1" and calls[0]["resume"] == "allow"
    assert calls[0]["project"] == "proj" and calls[0]["config"] == {"seed": 1}
    monkeypatch.delitem(sys.modules, "wandb")
    assert runs.tracking_problems(False, True) == []
    assert any("drop --no-track-tensorboard" in p for p in runs.tracking_problems(True, False))
    if importlib.util.find_spec("wandb") is None:  # CI: wandb is an optional extra
        assert any("--track needs wandb" in p for p in runs.tracking_problems(True, True))
        drq = subprocess.run([sys.executable, str(ROOT / "agents" / "drq.py"), "--track", "--output-dir",
                              str(tmp_path / "run")], capture_output=True, text=True, timeout=300)  # fmt: skip
        assert drq.returncode != 0 and "--track needs wandb" in drq.stderr and not (tmp_path / "run").exists()
