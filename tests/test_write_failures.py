"""Writes that cannot lose results: concurrent appends, a full or read-only disk (a real small tmpfs
where this machine lets the tests mount one), over-long names, interrupted writes, moved folders,
duplicate runs and interruptions. Each failure ends in one line naming the path and the reason."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from rlplastic.checkpoints import hold_run_folder, load_checkpoint, save_checkpoint
from rlplastic.files import TornLineWarning, WriteFailure, append_line, atomic_torch_save
from rlplastic.supervised.train import read_jsonl

DRQ_SMALL = ["--env-id", "Pong", "--seed", "1", "--learning-starts", "50", "--buffer-size", "500", "--batch-size",
             "8", "--eval-episodes", "1", "--eval-envs", "1", "--max-episode-steps", "200", "--diag-every", "0",
             "--log-every", "50", "--device", "cpu", "--no-track-tensorboard", "--threads", "1"]  # fmt: skip


def mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()[:80]}): needs root")


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB file system: writes past it fail with ENOSPC from the kernel."""
    where = tmp_path / "disk"
    mount_tmpfs(where, "1m")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def read_only_disk(tmp_path):
    """A real read-only file system, holding one empty folder `folder`."""
    where = tmp_path / "ro"
    mount_tmpfs(where, "1m")
    (where / "folder").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def agent(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "agents" / "drq.py"), *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def supervised(*argv: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "supervised.py"), "run", "--dataset", "digits", "--protocol",
            "fresh", "--epochs", "1", "--no-hessian", "--threads", "1", *argv]  # fmt: skip


def one_clear_line(proc: subprocess.CompletedProcess) -> str:
    """The failure message: non-zero exit, no traceback."""
    assert proc.returncode != 0, proc.stdout[-500:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr


# Appends
APPENDER = """
import sys
from rlplastic.files import append_line
for i in range(int(sys.argv[3])):
    append_line(sys.argv[1], {"writer": int(sys.argv[2]), "i": i, "pad": "x" * 2000})
"""


def test_concurrent_appends_from_real_processes_all_land(tmp_path):
    """Four processes appending 60 lines each to one file at once: all 240 lines, each whole. (The
    earlier append read the file and renamed a rewritten copy over it: lines of the others were lost.)"""
    path = tmp_path / "results.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(path), str(w), "60"]) for w in range(4)]
    assert all(proc.wait(timeout=120) == 0 for proc in procs)
    rows = read_jsonl(path)
    assert sorted((r["writer"], r["i"]) for r in rows) == [(w, i) for w in range(4) for i in range(60)]


def test_two_supervised_runs_into_one_out_both_land(tmp_path):
    out = tmp_path / "out.jsonl"
    procs = [subprocess.Popen(supervised("--seed", str(seed), "--out", str(out)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in (0, 1)]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert sorted(row["config"]["seed"] for row in read_jsonl(out)) == [0, 1]


def test_a_torn_last_line_is_kept_reported_and_the_new_line_stays_whole(tmp_path):
    path = tmp_path / "results.jsonl"
    append_line(path, {"a": 1})
    with open(path, "ab") as f:
        f.write(b'{"b": 2, "cut sh')  # a writer killed mid-line
    with pytest.warns(TornLineWarning, match=r"last line \(line 2\) was cut short"):
        append_line(path, {"c": 3})
    lines = path.read_text().splitlines()
    assert lines == ['{"a": 1}', '{"b": 2, "cut sh', '{"c": 3}']
    with pytest.raises(ValueError, match=":2: not a JSON line"):  # never silently dropped
        read_jsonl(path)


# A full disk
def test_a_full_disk_while_checkpointing_stops_with_one_line_and_keeps_the_previous_checkpoint(small_disk):
    """torch.save on a really full disk raises RuntimeError, not OSError: still one line, old file intact."""
    path = small_disk / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.zeros(1_000)}, "drq")
    before = path.read_bytes()
    with pytest.raises(SystemExit) as stop:
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(1_000_000)}, "drq")  # 4 MB on a 1 MiB disk
    message = str(stop.value)
    assert f"could not write the checkpoint {path}" in message and "No space left on device" in message
    assert "the previous checkpoint" in message and "is kept" in message
    assert path.read_bytes() == before and sorted(p.name for p in small_disk.iterdir()) == ["checkpoint.pt"]


def test_a_full_disk_is_a_write_failure_for_every_writer(small_disk):
    with pytest.raises(WriteFailure) as failure:
        atomic_torch_save(small_disk / "model.pt", {"w": torch.zeros(1_000_000)})
    assert failure.value.errno == errno.ENOSPC and str(small_disk / "model.pt") in str(failure.value)
    path = small_disk / "lines.jsonl"
    append_line(path, {"kept": True})
    with pytest.raises(WriteFailure, match="No space left on device"):
        append_line(path, {"pad": "x" * 2_000_000})
    assert read_jsonl(path) == [{"kept": True}]  # a partial line is taken back


@pytest.mark.slow
def test_an_agent_run_on_a_full_disk_ends_with_one_line(small_disk):
    proc = agent(*DRQ_SMALL, "--total-steps", "300", "--checkpoint-every", "100", "--output-dir",
                 str(small_disk / "run"))  # fmt: skip
    err = one_clear_line(proc)
    assert "could not write the checkpoint" in err and "No space left on device" in err


# Read-only destinations and over-long names: refused before any work
def test_read_only_destinations_are_refused_before_any_work(read_only_disk):
    proc = agent(*DRQ_SMALL, "--total-steps", "300", "--output-dir", str(read_only_disk / "folder"))
    err = one_clear_line(proc)
    assert f"{read_only_disk / 'folder'}: cannot write in this folder (Read-only file system)" in err
    assert "step 50" not in proc.stdout  # no training happened
    proc = subprocess.run(supervised("--out", str(read_only_disk / "folder" / "out.jsonl")), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    err = one_clear_line(proc)
    assert "Read-only file system" in err and "epoch 1/1" not in proc.stdout


@pytest.mark.slow
def test_over_long_names_are_refused_with_one_line(tmp_path):
    long_name = "x" * 300
    err = one_clear_line(agent(*DRQ_SMALL, "--output-dir", str(tmp_path / long_name)))
    assert "--output-dir" in err and "File name too long" in err
    proc = subprocess.run(supervised("--out", str(tmp_path / f"{long_name}.jsonl")), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    err = one_clear_line(proc)
    assert "--out" in err and "File name too long" in err
    name = "y" * 250 + ".json"  # fits, but its lock file beside it (name.lock) would not
    proc = subprocess.run(supervised("--out", str(tmp_path / name)), capture_output=True, text=True, timeout=300)
    assert "longer than this file system allows (255 bytes)" in one_clear_line(proc)


# Interrupted writes and moved folders
def test_temp_files_of_an_interrupted_write_go_when_the_run_starts_again(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    leftover = folder / ".checkpoint.pt.k3y8a1.tmp"  # what a kill during atomic_write leaves
    leftover.write_bytes(b"\0" * 1000)
    (folder / "keep.txt").write_text("mine")
    hold_run_folder(folder, "drq")
    assert not leftover.exists() and (folder / "keep.txt").exists()
    assert "removed .checkpoint.pt.k3y8a1.tmp" in capsys.readouterr().out


def test_where_a_run_folder_lives_is_not_part_of_its_identity(tmp_path):
    config = {"env_id": "Pong", "seed": 1, "output_dir": str(tmp_path / "old"), "learning_rate": 1e-4}
    save_checkpoint(tmp_path / "checkpoint.pt", {"format": 2, "step": 5, "config": config}, "drq")
    from rlplastic.checkpoints import RESUMABLE_CHANGES

    moved = config | {"output_dir": str(tmp_path / "new")}
    assert load_checkpoint(tmp_path / "checkpoint.pt", moved, RESUMABLE_CHANGES, "cpu", "drq")["step"] == 5
    with pytest.raises(SystemExit, match=r"other arguments \(learning_rate\)"):
        load_checkpoint(tmp_path / "checkpoint.pt", moved | {"learning_rate": 1e-3}, RESUMABLE_CHANGES, "cpu", "drq")


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_moved_interrupted_run_resumes_in_its_new_folder_and_ctrl_c_and_sigterm_say_how_to_resume(tmp_path):
    """A run stopped by Ctrl-C (exit 130) or SIGTERM (143) prints one line with the step reached, the
    checkpoint kept and how to resume; its folder, moved elsewhere, resumes there."""
    old, new = tmp_path / "disk_a" / "run", tmp_path / "disk_b" / "run"
    command = [sys.executable, str(ROOT / "agents" / "drq.py"), *DRQ_SMALL, "--total-steps", "5000",
               "--checkpoint-every", "100"]  # fmt: skip
    proc = subprocess.Popen([*command, "--output-dir", str(old)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)  # fmt: skip
    wait_for(old / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "drq: Pong seed 1 interrupted at step" in err and "run the same command to resume" in err
    ours = [line for line in err.splitlines() if "A.L.E" not in line and "Stella" not in line]  # ALE's banner
    assert len(ours) == 1 and (old / "checkpoint.pt").exists()

    new.parent.mkdir()
    shutil.move(old, new)
    proc = subprocess.Popen([*command, "--output-dir", str(new)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)  # fmt: skip
    deadline = time.time() + 240
    while True:  # resumed, then a further checkpoint
        saved = torch.load(new / "checkpoint.pt", weights_only=True)["step"] if (new / "checkpoint.pt").exists() else 0
        if saved >= 300:
            break
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert f"resumed from {new / 'checkpoint.pt'}" in out
    assert "interrupted at step" in err and f"is kept in {new}" in err
    assert not list(new.glob(".*.tmp"))


# Duplicates
def test_two_spellings_of_one_game_in_one_command_are_refused(tmp_path):
    err = one_clear_line(agent("--env-id", "Pong", "ALE/Pong-v5", "--seed", "1", "--device", "cpu", "--output-dir",
                               str(tmp_path / "runs")))  # fmt: skip
    assert "a (game, seed) repeats" in err and "('Pong', 1), ('Pong', 1)" in err
    assert not (tmp_path / "runs").exists()


def test_cpu_threads_follow_the_flag_then_omp_num_threads_then_the_cores(monkeypatch):
    from rlplastic.machine import available_cores, cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads(3) == 3 and cpu_threads(0) == available_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads(0) == 1 and cpu_threads(2) == 2


def test_warnings_module_is_quiet_for_whole_files(tmp_path):
    path = tmp_path / "ok.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(3):
            append_line(path, {"i": i})
    assert [row["i"] for row in read_jsonl(path)] == [0, 1, 2]
    assert json.loads(path.read_text().splitlines()[0]) == {"i": 0}
