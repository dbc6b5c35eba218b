"""The cloning experiment of Joudaki et al. (section 2, Fig. 2.1)."""

import pytest
import torch

from rlplastic.cloning import MLP, CloningConfig, clone_mlp, cloning_r2, run_cloning


def test_cloning_sgd_stays_on_the_manifold_noise_and_dropout_leave_it(tmp_path):
    """Joudaki et al., Fig. 2.1: exact clones stay exact under SGD (so the clone's 16 features never
    hold more than the base's 8 directions), while noisy SGD and dropout break the symmetry."""
    base = MLP(5, 3, 2)
    wide = clone_mlp(base, 4)
    x = torch.randn(16, 5)
    assert torch.allclose(wide(x), base(x), atol=1e-6)
    h = torch.randn(10, 3).repeat_interleave(4, 1)
    assert cloning_r2(h, 4) == pytest.approx(1.0) and cloning_r2(torch.randn(10, 12), 4) < 0.6

    config = CloningConfig(hidden=8, factor=2, base_steps=200, steps=300, measure_every=100)
    histories = run_cloning(config)["histories"]
    sgd = histories["sgd"][-1]
    assert sgd["cloning_r2"] == pytest.approx(1.0, abs=1e-6) and sgd["effective_rank"] <= 8 + 1e-3
    assert all(histories[v][-1]["effective_rank"] > sgd["effective_rank"] for v in ("noisy-sgd", "dropout"))
    assert histories["noisy-sgd"][-1]["cloning_r2"] < 0.9999 and histories["dropout"][-1]["cloning_r2"] < 0.9999


def test_bad_settings_are_refused_by_name_before_training():
    with pytest.raises(ValueError, match=r"--config.hidden 0.*--config.seed -1: a seed must be an integer in \[0, "):
        run_cloning(CloningConfig(hidden=0, seed=-1))


def test_script_killed_mid_way_trains_only_the_variants_it_lacks(tmp_path, monkeypatch):
    """cloning.json is saved after every variant; the same command again keeps the finished ones and
    the rest (dropout included, which draws from the global generator) come out as without the kill."""
    import json
    import sys

    from conftest import ROOT, killed_on_call

    import rlplastic.cloning as cloning

    sys.path.insert(0, str(ROOT / "scripts"))
    import cloning as script

    config = CloningConfig(hidden=4, factor=2, base_steps=50, steps=60, measure_every=20)
    script.main(script.Args(out=tmp_path / "straight", config=config))
    # trains the base, then the runs "base", "sgd", "noisy-sgd" (killed), "dropout"
    stand_in, calls = killed_on_call(4, cloning.train)
    monkeypatch.setattr(cloning, "train", stand_in)
    with pytest.raises(KeyboardInterrupt):
        script.main(script.Args(out=tmp_path / "killed", config=config))
    assert list(json.loads((tmp_path / "killed" / "cloning.json").read_text())["histories"]) == ["base", "sgd"]
    calls.clear()
    script.main(script.Args(out=tmp_path / "killed", config=config))
    assert len(calls) == 3  # the base again (the clones are made of it), noisy SGD, dropout
    straight, resumed = (json.loads((tmp_path / d / "cloning.json").read_text()) for d in ("straight", "killed"))
    assert resumed == straight and resumed["complete"] is True
    with pytest.raises(SystemExit, match="cloning.json holds the results of other settings"):
        script.main(script.Args(out=tmp_path / "killed", config=CloningConfig(hidden=5)))
