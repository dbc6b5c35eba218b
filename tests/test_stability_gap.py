"""The stability-gap protocol (Zhankov): rotated digits, replay, continual evaluation, GD and TTR."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ROOT, killed_on_call
from test_supervised import write_idx

from rlplastic.supervised.stability_gap import StabilityGapConfig, gap_metrics, rotate, run_stability_gap


def test_gap_depth_and_time_to_recover_on_a_known_curve():
    # task 1: 90% before the switch, dips to 70% two batches in, back to 89.5% at batch 4 of 5
    task1 = [80, 90, 85, 70, 75, 89.5, 90]
    task2 = [10, 10, 50, 60, 70, 80, 85]
    metrics = gap_metrics(np.array([task1, task2], dtype=float), boundaries=[0, 2], tolerance=1.0)
    assert metrics["GD_1,2"] == pytest.approx(20.0)
    assert metrics["TTR_1,2"] == pytest.approx(100 * 4 / 5)  # the 4th batch of the interval is within 1 p.p.
    assert metrics["ACC_AVG,2"] == pytest.approx((90 + 85) / 2) and metrics["ACC_AVG,1"] == pytest.approx(90)
    never = gap_metrics(np.array([[90, 90, 50, 60], [0, 0, 0, 0]], dtype=float), [0, 2], 1.0)
    assert never["TTR_1,2"] == 100.0


def test_rotation_turns_an_image_about_its_centre():
    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, 4, 8] = 1.0  # right edge, middle row
    turned = rotate(image, 90.0)
    assert turned[0, 0].argmax().item() in (4, 76) and rotate(image, 0.0) is image  # top or bottom middle


def test_baseline_and_neuronal_decay_run_on_digits_and_on_mnist_idx_files(tmp_path):
    config = StabilityGapConfig(epochs=1, eval_samples=100, batch_size=64)
    result = run_stability_gap(config)
    curves = np.array(result["curves"])
    assert curves.shape[0] == 3 and result["boundaries"][0] == 0 and len(result["boundaries"]) == 3
    assert curves.shape[1] == 3 * len(range(0, 1437 - 1, 64))  # one evaluation per batch
    assert {"GD_1,3", "TTR_1,3", "ACC_AVG,3"} <= set(result["metrics"]) and result["data"] == "digits"
    decay = run_stability_gap(StabilityGapConfig(epochs=1, eval_samples=100, batch_size=64, method="neuronal-decay"))
    assert decay["curves"] != result["curves"]
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (40, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, 40))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 10))
    mnist = run_stability_gap(StabilityGapConfig(data_dir=str(tmp_path), epochs=1, batch_size=16, angles=(0, 45)))
    assert mnist["data"] == "mnist" and np.array(mnist["curves"]).shape == (2, 6)
    with pytest.raises(ValueError, match="method 'magic'"):
        run_stability_gap(StabilityGapConfig(method="magic"))


@pytest.mark.slow
def test_script_writes_its_table_and_figure(tmp_path):
    out = tmp_path / "sg"
    command = [sys.executable, str(ROOT / "scripts" / "stability_gap.py"), "--out", str(out), "--seeds", "1"]
    command += ["--config.epochs", "1", "--config.eval-samples", "50"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| GD_1,3 |" in (out / "stability_gap.md").read_text() and (out / "stability_gap.png").stat().st_size > 0
    assert set(json.loads((out / "stability_gap.json").read_text())["runs"]) == {"baseline", "neuronal-decay"}


def test_script_killed_after_a_run_goes_on_where_it_stopped(tmp_path, monkeypatch):
    """stability_gap.json is saved after every run; the same command again runs only the missing
    ones and writes what an uninterrupted invocation writes; other settings on the folder are refused."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import stability_gap as script

    def args(out, seeds=2):
        config = StabilityGapConfig(epochs=1, eval_samples=50, batch_size=128)
        return script.Args(out=tmp_path / out, methods=("baseline", "neuronal-decay"), seeds=seeds, config=config)

    script.main(args("straight"))
    stand_in, calls = killed_on_call(3, run_stability_gap)
    monkeypatch.setattr(script, "run_stability_gap", stand_in)
    with pytest.raises(KeyboardInterrupt):
        script.main(args("killed"))
    partial = json.loads((tmp_path / "killed" / "stability_gap.json").read_text())
    assert {m: len(r) for m, r in partial["runs"].items()} == {"baseline": 2} and not partial["complete"]
    calls.clear()
    script.main(args("killed"))
    assert [(c.method, c.seed) for (c,) in calls] == [("neuronal-decay", 0), ("neuronal-decay", 1)]
    for name in ("stability_gap.json", "stability_gap.md"):
        assert (tmp_path / "killed" / name).read_text() == (tmp_path / "straight" / name).read_text(), name
    with pytest.raises(SystemExit, match=r"holds the results of other settings \(not the same: seeds\)"):
        script.main(args("killed", seeds=3))
    with pytest.raises(SystemExit, match="holds runs of --methods baseline neuronal-decay, not all given now"):
        script.main(replace(args("killed"), methods=("baseline",)))
