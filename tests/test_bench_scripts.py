"""The bench scripts run (tiny settings on the CPU) and print their figures; the figures
themselves are measured on real settings and recorded in README, never asserted here."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

BENCHES = {
    "bench_drq": (["--env-steps", "50", "--updates", "2", "--full-steps", "60", "--learning-starts", "40",
                   "--batched", "1", "2", "--batched-updates", "1"],
                  ["batched update (eager),   2 runs", "the table's final evaluations (130 x 131,000",
                   "ratio full / ideal"]),
    "bench_bbf": (["--updates", "1", "--width-scale", "1", "--hidden-dim", "32", "--env-steps", "50"],
                  ["fp32 eager:", "bf16 eager:"]),
    "bench_interventions": (["--updates", "1", "--repeats", "1"],
                            ["eager update: hare-tortoise", "eager update: lifecycle layers"]),
    "bench_diagnostics": (["--calls", "1", "--updates", "2"], ["share of a DrQ run"]),
    "bench_supervised": (["--batches", "1", "--batch-size", "16", "--variants", "fp32", "bf16+channels-last",
                          "bf16+graph"],
                         ["fp32 ", "bf16+channels-last ", "bf16+graph           skipped: CUDA graphs need a CUDA"]),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BENCHES))
def test_bench_script_runs_and_prints_its_figures(name):
    argv, expected = BENCHES[name]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), "--device", "cpu", *argv],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in expected:
        assert text in proc.stdout, (name, text, proc.stdout[-2000:])


def test_the_op_counter_counts_kernels_not_views_or_allocations():
    """Each counted operator is a kernel on a GPU; views and bare allocations launch none, and the
    fused (foreach) form of a per-tensor loop counts once."""
    import torch

    from rlplastic.bench import DeviceOpCounter

    tensors = [torch.ones(3) for _ in range(4)]
    with DeviceOpCounter() as ops:
        x = torch.empty(6).view(2, 3).t()  # allocation and views: free
        with torch.profiler.record_function("a profiler range, as around optimizer.step(): free"):
            y = x.abs() + 1.0  # two kernels
        torch._foreach_add_(tensors, 1.0)  # one fused kernel for four tensors
    assert ops.total == 3 and ops.counts == {"abs": 1, "add": 1, "_foreach_add_": 1} and y.shape == (3, 2)
    with DeviceOpCounter() as ops:
        for t in tensors:
            t.add_(1.0)
    assert ops.total == 4
