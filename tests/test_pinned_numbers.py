"""The agents' numbers, pinned: fixed-seed CPU runs whose evaluation returns, TD losses and
intervention activity were recorded (tests/data/pinned_numbers.json) by the code before a
refactor; the same runs must give the same numbers after it. A change of results is then a
decision, never an accident: re-pin with `python tests/test_pinned_numbers.py --write` and say why
in the commit.

Bit-identical numbers need the same reductions AND the same kernels. One thread fixes the order of
float reductions; the kernels are picked by the CPU's instruction set (ATen's CPU capability, oneDNN's
ISA, MKL's code path), and AVX-512 or AMX kernels round differently from AVX2 ones (measured on an
AVX-512 machine: the bbf run's loss at step 120 is 4.98579 with its own kernels, 4.98585 with AVX2's).
So the runs force the AVX2 kernels (PINNED_KERNELS), which every x86-64 CPU of the last decade has:
the same numbers on an AVX2, an AVX-512 or an AMX machine. A CPU without AVX2 (or not x86-64) cannot
run them: the tests skip there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "tests" / "data" / "pinned_numbers.json"

DRQ = ["--env-id", "Breakout", "--seed", "3", "--total-steps", "400", "--learning-starts", "100", "--buffer-size",
       "1000", "--batch-size", "8", "--log-every", "50", "--eval-episodes", "2", "--eval-envs", "2",
       "--max-episode-steps", "300", "--diag-every", "0", "--checkpoint-every", "0", "--device", "cpu"]  # fmt: skip
BBF = ["--env-id", "Breakout", "--seed", "2", "--width-scale", "1", "--hidden-dim", "32", "--batch-size", "4",
       "--total-steps", "200", "--learning-starts", "100", "--anneal-steps", "100", "--eval-episodes", "1",
       "--eval-envs", "1", "--max-episode-steps", "150", "--buffer-size", "1000", "--log-every", "20",
       "--diag-every", "0", "--checkpoint-every", "0", "--device", "cpu"]  # fmt: skip

# name -> (agent, arguments). The flags are today's names; the pins record the flags they were made with.
CONFIGS = {
    "drq": ("drq", DRQ),
    "drq_resets": ("drq", DRQ + ["--ema", "0.99", "--reset", "hare-tortoise", "head", "shrink-perturb",
                                 "--ht-every", "60", "--head-every", "120", "--sp-every", "90"]),
    "drq_redo": ("drq", DRQ + ["--reset", "redo", "--redo-every", "50", "--redo-batch", "32"]),
    "drq_cbp_noise": ("drq", DRQ + ["--continual", "cbp", "noise", "--cbp-rate", "0.01", "--cbp-maturity", "10"]),
    "drq_lifecycle": ("drq", DRQ + ["--continual", "lifecycle", "--lifecycle-lifespan", "50", "100",
                                    "--lifecycle-recovery", "10", "20"]),
    "bbf": ("bbf", BBF + ["--bbf-reset-every", "130"]),
    "bbf_ht_nospr": ("bbf", BBF + ["--bbf-reset-every", "0", "--reset", "hare-tortoise", "--ht-every", "30",
                                   "--no-spr"]),
}  # fmt: skip


# The kernels the pins were recorded with: ATen's dispatch, oneDNN and MKL (its reproducible mode) at AVX2.
PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def cpu_has_avx2() -> bool:
    try:
        return " avx2 " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


def run_pinned(agent: str, argv: list[str], folder: Path, results_in: Path | None = None) -> dict:
    """Run an agent from the command line on one thread with the pinned kernels; the numbers the
    pins compare (from `results_in`, default `folder`)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0", **PINNED_KERNELS}
    proc = subprocess.run([sys.executable, str(ROOT / "agents" / f"{agent}.py"), *argv, "--output-dir", str(folder),
                           "--no-track-tensorboard"], capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(((results_in or folder) / "results.json").read_text())
    return {
        "eval_returns": results["eval_returns"],
        "train_episodes": [[e["step"], e["return"]] for e in results["train_episodes"]],
        "train_log": results["train_log"],
        "resets": results.get("resets"),
    }


@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_avx2(), reason="the pins were recorded with AVX2 kernels, which this CPU lacks")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fixed_seed_runs_give_the_pinned_numbers(name, tmp_path):
    pinned = json.loads(PINS.read_text())[name]
    agent, argv = CONFIGS[name]
    assert_pinned(run_pinned(agent, argv, tmp_path / name), pinned, name)


def assert_pinned(numbers: dict, pinned: dict, name: str) -> None:
    assert numbers["eval_returns"] == pinned["eval_returns"]
    assert numbers["train_episodes"] == pinned["train_episodes"]
    assert numbers["resets"] == pinned["resets"]
    assert [row["step"] for row in numbers["train_log"]] == [row["step"] for row in pinned["train_log"]]
    for row, pinned_row in zip(numbers["train_log"], pinned["train_log"], strict=True):
        assert set(row) == set(pinned_row)
        for key, value in pinned_row.items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, row["step"], key)


@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_avx2(), reason="the pins were recorded with AVX2 kernels, which this CPU lacks")
@pytest.mark.parametrize("name", ["drq", "drq_resets"])
def test_a_run_among_several_in_one_process_gives_its_pinned_numbers(name, tmp_path):
    """The many-runs path (agents/drq_batched.py: --seed 3 4 in one process, each run's own update
    on a CPU) gives the pinned run its numbers alone."""
    pinned = json.loads(PINS.read_text())[name]
    agent, argv = CONFIGS[name]
    at = argv.index("--seed")
    argv = [*argv[: at + 2], "4", *argv[at + 2 :]]  # seed 3, then seed 4 beside it
    folder = tmp_path / name / "{seed}"
    assert_pinned(run_pinned(agent, argv, folder, results_in=tmp_path / name / "3"), pinned, name)


if __name__ == "__main__":  # python tests/test_pinned_numbers.py --write [name ...]
    import tempfile

    assert sys.argv[1:2] == ["--write"], "usage: python tests/test_pinned_numbers.py --write [name ...]"
    pins = json.loads(PINS.read_text()) if PINS.exists() else {}
    for name in sys.argv[2:] or sorted(CONFIGS):
        agent, argv = CONFIGS[name]
        with tempfile.TemporaryDirectory() as folder:
            pins[name] = {"agent": agent, "argv": argv, **run_pinned(agent, argv, Path(folder) / name)}
        print(name, pins[name]["eval_returns"], flush=True)
    PINS.write_text(json.dumps(pins, indent=1) + "\n")
