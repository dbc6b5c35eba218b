import json
import sys

import pytest
import torch
from conftest import ROOT, killed_on_call

from rlplastic.bitflip import BitFlipConfig, BitFlippingTask, run_bitflip


def test_target_is_a_network_of_linear_threshold_units():
    task = BitFlippingTask(bits=4, flipping=2, flip_every=10, target_units=2, beta=0.5, seed=0)
    task.weights = torch.tensor([[1.0, -1.0, 1.0, 1.0, -1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    task.thresholds = 4 * 0.5 - (task.weights < 0).sum(1).float()  # [0, 2]
    task.output_weights = torch.tensor([1.0, -1.0])
    x = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    # unit 0: w.x = [1 - 1 - 1, -1 - 1, 1 - 1 + 1 + 1 - 1] = [-1, -2, 1] >= 0 -> fires on the third only
    # unit 1: w.x = [3, 2, 5] >= 2 -> fires on all; y = h0 - h1
    assert task.target(x).tolist() == [0.0 - 1.0, 0.0 - 1.0, 1.0 - 1.0]


def test_thresholds_follow_the_negative_weight_count():
    task = BitFlippingTask(bits=20, flipping=15, flip_every=10, target_units=50, beta=0.7, seed=3)
    assert torch.equal(task.thresholds, 20 * 0.7 - (task.weights < 0).sum(1).float())
    assert set(task.weights.unique().tolist()) == {-1.0, 1.0}


def test_one_flipping_bit_changes_every_flip_every_steps_and_free_bits_are_random():
    task = BitFlippingTask(bits=20, flipping=15, flip_every=10, target_units=5, beta=0.7, seed=1)
    previous = task.flipping_bits.clone()
    free = []
    for step in range(100):
        x, _ = task.sample(step)
        changed = int((task.flipping_bits != previous).sum())
        assert changed == (1 if step % 10 == 0 else 0)
        previous = task.flipping_bits.clone()
        assert torch.equal(x[0, :15], task.flipping_bits) and x[0, -1] == 1.0
        free.append(x[0, 15:20])
    free = torch.stack(free)
    assert 0.3 < free.mean().item() < 0.7


@pytest.mark.slow
def test_sgd_loses_plasticity_and_cbp_restores_it():
    config = BitFlipConfig(lr=0.03, steps=40_000, record_every=10_000)
    plain = run_bitflip(config)
    switched = run_bitflip(config, cbp_from=20_000)
    assert plain["dead"][1] == switched["dead"][1]  # identical until the switch
    assert plain["dead"][-1] > plain["dead"][0] and plain["dead"][-1] > 0.7
    assert plain["effective_rank"][-1] < plain["effective_rank"][0]
    # measured: dead 0.82 at the switch -> 0.41 with CBP vs 0.97 without; rank 53 vs 21
    assert switched["dead"][-1] < 0.6 * switched["dead"][1] and switched["dead"][-1] < plain["dead"][-1] - 0.4
    assert switched["effective_rank"][-1] > 2 * plain["effective_rank"][-1]


def test_script_writes_json_table_and_plot(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bitflip

    config = BitFlipConfig(steps=2_000, record_every=500, probe_size=100)
    bitflip.main(bitflip.Args(out=tmp_path, config=config))
    saved = json.loads((tmp_path / "bitflip.json").read_text())
    assert saved["switch_step"] == 1_000 and len(saved["runs"]) == 2
    assert all(r["step"] == [500, 1000, 1500, 2000] for r in saved["runs"].values())
    assert (tmp_path / "bitflip.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "effective rank" in (tmp_path / "bitflip.md").read_text()


def test_script_killed_after_one_run_goes_on_where_it_stopped(tmp_path, monkeypatch):
    """No run loses what it produced: bitflip.json is saved after each run, the same command again
    runs only the missing one and writes what an uninterrupted invocation writes; another config
    on the same folder is refused and the file kept."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bitflip

    config = BitFlipConfig(steps=1_000, record_every=250, probe_size=50)
    bitflip.main(bitflip.Args(out=tmp_path / "straight", config=config))
    stand_in, calls = killed_on_call(2, run_bitflip)
    monkeypatch.setattr(bitflip, "run_bitflip", stand_in)
    with pytest.raises(KeyboardInterrupt):
        bitflip.main(bitflip.Args(out=tmp_path / "killed", config=config))
    partial = json.loads((tmp_path / "killed" / "bitflip.json").read_text())
    assert list(partial["runs"]) == ["SGD"] and partial["complete"] is False
    calls.clear()
    bitflip.main(bitflip.Args(out=tmp_path / "killed", config=config))
    assert len(calls) == 1  # only the CBP run was run again
    for name in ("bitflip.json", "bitflip.md"):
        assert (tmp_path / "killed" / name).read_text() == (tmp_path / "straight" / name).read_text(), name
    before = (tmp_path / "killed" / "bitflip.json").read_text()
    with pytest.raises(SystemExit, match=r"--out .*killed: bitflip.json holds the results of other settings \(not "
                                         r"the same: config, switch_step\); it is kept"):  # fmt: skip
        bitflip.main(bitflip.Args(out=tmp_path / "killed", config=BitFlipConfig(steps=2_000)))
    assert (tmp_path / "killed" / "bitflip.json").read_text() == before
