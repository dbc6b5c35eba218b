import gzip
import json
import math
import pickle
import struct
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ROOT, Planted

from rlplastic.supervised import data as sdata
from rlplastic.supervised.models import build_model
from rlplastic.supervised.train import (
    METHODS,
    RunConfig,
    TopKActivation,
    TopKController,
    append_jsonl,
    crop_flip,
    read_jsonl,
    run,
    validate,
)


def write_cifar(root, classes):
    rng = np.random.default_rng(0)
    if classes == 10:
        folder = root / "cifar-10-batches-py"
        names, key = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
    else:
        folder = root / "cifar-100-python"
        names, key = ["train", "test"], b"fine_labels"
    folder.mkdir(parents=True)
    written = {}
    for name in names:
        images = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, classes, 4))
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": images, key: labels, b"batch_label": b"x"}, f)
        written[name] = (images, labels)
    return written


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_pickle_batches_read_back(tmp_path, classes):
    written = write_cifar(tmp_path, classes)
    x_train, y_train, x_test, y_test = sdata.read_cifar(tmp_path, classes)
    assert x_train.shape == ((20 if classes == 10 else 4), 3, 32, 32) and x_test.shape == (4, 3, 32, 32)
    first = written["data_batch_1" if classes == 10 else "train"]
    assert np.array_equal(x_train[0, 0].reshape(-1), first[0][0, :1024])  # row-major R plane first
    assert y_train[:4].tolist() == [int(v) for v in first[1]]
    test = written["test_batch" if classes == 10 else "test"]
    assert y_test.tolist() == [int(v) for v in test[1]]


def test_a_doctored_cifar_batch_cannot_run_code(tmp_path):
    write_cifar(tmp_path, 100)
    marker = tmp_path / "code_ran"
    with open(tmp_path / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({b"data": Planted(marker), b"fine_labels": [1]}, f)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load pathlib.*touch"):
        sdata.read_cifar(tmp_path, 100)
    assert not marker.exists()


def test_cifar10c_and_mca_inputs(tmp_path):
    write_cifar(tmp_path, 10)
    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    np.save(folder / "labels.npy", np.arange(6) % 10)
    np.save(folder / "fog.npy", np.zeros((6, 32, 32, 3), dtype=np.uint8))
    dataset = sdata.load_dataset("cifar10", tmp_path)
    assert list(dataset.corruptions) == ["fog"]
    images, labels = dataset.corruptions["fog"]
    assert images.shape == (6, 3, 32, 32) and labels.tolist() == [0, 1, 2, 3, 4, 5]


def write_idx(path, array, packed=False):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    (gzip.open if packed else open)(path, "wb").write(payload)


def test_mnist_idx_files_plain_and_gzipped(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28))
    labels = np.array([3, 1, 4, 1, 5])
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, packed=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:2])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:2], packed=True)
    x_train, y_train, x_test, y_test = sdata.read_mnist(tmp_path)
    assert x_train.shape == (5, 1, 28, 28) and np.array_equal(x_train[:, 0], images)
    assert y_train.tolist() == [3, 1, 4, 1, 5] and y_test.tolist() == [3, 1]


def test_tiny_imagenet_folder_layout(tmp_path):
    from PIL import Image

    folder = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    (folder / "val" / "images").mkdir(parents=True)
    folder.joinpath("wnids.txt").write_text("\n".join(wnids) + "\n")
    for i, w in enumerate(wnids):
        (folder / "train" / w / "images").mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (64, 64), (40 * i, 10 * j, 0)).save(folder / "train" / w / "images" / f"{w}_{j}.JPEG")
    Image.new("RGB", (64, 64), (0, 0, 200)).save(folder / "val" / "images" / "val_0.JPEG")
    folder.joinpath("val/val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t63\t63\n")
    x_train, y_train, x_test, y_test = sdata.read_tiny_imagenet(tmp_path)
    assert x_train.shape == (4, 3, 64, 64) and y_train.tolist() == [0, 0, 1, 1]
    assert y_test.tolist() == [1] and abs(int(x_test[0, 2].mean()) - 200) <= 2


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "tiny-imagenet"])
def test_missing_files_are_named_with_their_source(tmp_path, name):
    with pytest.raises(sdata.DataError) as error:
        sdata.load_dataset(name, tmp_path)
    message = str(error.value)
    assert name in message and str(tmp_path) in message and "http" in message


def test_offline_data_sets(tmp_path, monkeypatch):
    monkeypatch.setenv("RLPLASTIC_CACHE", str(tmp_path))
    digits = sdata.load_dataset("digits")
    assert digits.x_train.shape == (1437, 1, 8, 8) and digits.x_test.shape == (360, 1, 8, 8)
    assert digits.num_classes == 10 and abs(float(digits.x_train.mean())) < 1e-5
    m1d = sdata.load_dataset("mnist1d")
    assert m1d.x_train.shape == (8000, 40) and m1d.x_test.shape == (2000, 40) and m1d.num_classes == 10
    assert (tmp_path / "mnist1d_10000.npz").exists()  # cached: the next load skips generation
    again = sdata.load_dataset("mnist1d")
    assert np.array_equal(again.x_train, m1d.x_train)


def test_subset_and_label_noise_are_seeded_and_recorded():
    labels = np.arange(10_000) % 10
    idx, noisy, record = sdata.subset_with_noise(labels, 0.1, 0.5, 10, seed=3)
    assert len(idx) == 1000 == record["size"] and len(set(idx.tolist())) == 1000
    assert record["replaced"] == pytest.approx(500, abs=60)  # ~50% replaced
    assert record["changed"] == pytest.approx(0.9 * record["replaced"], abs=40)  # 1 in 10 draws the true class
    assert record["changed"] == int((noisy != labels[idx]).sum())
    again = sdata.subset_with_noise(labels, 0.1, 0.5, 10, seed=3)
    assert np.array_equal(again[0], idx) and np.array_equal(again[1], noisy)
    clean = sdata.subset_with_noise(labels, 1.0, 0.0, 10, seed=3)
    assert np.array_equal(clean[1], labels)


@pytest.mark.parametrize(
    ("name", "params"),
    [("resnet18", 11.17e6), ("vgg16", 16.8e6), ("vit-tiny", 5.36e6), ("wrn-28-4", 5.85e6)],
)
def test_image_models_forward_and_split(name, params):
    model = build_model(name, (3, 32, 32), 10)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert isinstance(model.head, torch.nn.Linear) and model.encoder(torch.zeros(2, 3, 32, 32)).ndim == 2
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.03)


def test_mlp_and_crelu_halve_the_width():
    plain, crelu = build_model("mlp", (40,), 10), build_model("mlp", (40,), 10, crelu=True)
    assert plain(torch.zeros(3, 40)).shape == crelu(torch.zeros(3, 40)).shape == (3, 10)
    assert [m.out_features for m in crelu.modules() if isinstance(m, torch.nn.Linear)] == [50, 50, 10]
    assert crelu.head.in_features == plain.head.in_features == 100  # [relu(x), -relu(-x)] doubles 50
    h = crelu.encoder(torch.randn(8, 40))
    assert (h[:, :50] >= 0).all() and (h[:, 50:] <= 0).all()
    with pytest.raises(ValueError, match="needs images"):
        build_model("resnet18", (40,), 10)


def test_crop_flip_moves_pixels_within_the_padding():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    out = crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for i in range(2):  # every output row is a shifted (maybe flipped) slice of an input row, or padding
        values = set(out[i].flatten().tolist()) - {0.0}
        assert values <= set(x[i].flatten().tolist())


def test_topk_keeps_the_largest_share_and_cycles():
    controller = TopKController(minimum=0.25, decay=0.5, cycle=3)
    layer = TopKActivation(torch.nn.ReLU(), controller)
    x = torch.tensor([[4.0, -1.0, 3.0, 2.0, 1.0, 0.5, 6.0, 5.0]])
    assert torch.equal(layer(x), torch.relu(x))
    controller.next_epoch()  # keep 0.5: 4 of 8 units
    assert layer(x).tolist() == [[4.0, 0.0, 3.0, 0.0, 0.0, 0.0, 6.0, 5.0]]
    controller.next_epoch()  # 0.25
    assert layer(x).tolist() == [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 6.0, 5.0]]
    controller.next_epoch()  # epoch 3: back to dense
    assert controller.keep == 1.0


def test_adaptive_topk_controllers_compress_and_reset():
    """The accuracy controller compresses while training accuracy holds within the tolerance of the
    last dense epoch's and resets when it drops; the plateau controller compresses only while the
    loss is flat, holds while it falls, and resets at the minimum."""
    from rlplastic.supervised.train import AdaptiveTopKController

    acc = AdaptiveTopKController("accuracy", minimum=0.1, decay=0.5, tolerance=0.02)
    keeps = []
    for train_acc in (0.90, 0.89, 0.89, 0.80, 0.91):
        acc.next_epoch(train_acc=train_acc)
        keeps.append(acc.keep)
    assert keeps == [0.5, 0.25, 0.125, 1.0, 0.5] and acc.resets == 1  # 0.80 < 0.90 - 0.02: back to dense
    plateau = AdaptiveTopKController("plateau", minimum=0.2, decay=0.5, tolerance=0.01)
    keeps = []
    for loss in (1.0, 0.5, 0.499, 0.4985, 0.30, 0.2999, 0.2999):
        plateau.next_epoch(loss=loss)
        keeps.append(plateau.keep)
    assert keeps == [1.0, 1.0, 0.5, 0.25, 0.25, 1.0, 0.5] and plateau.resets == 1
    with pytest.raises(ValueError, match="strategy 'magic'"):
        AdaptiveTopKController("magic", 0.1, 0.5, 0.0)


def test_validate_names_bad_values():
    problems = "\n".join(validate(RunConfig(dataset="svhn", method="magic", subset=0.0)))
    assert "--dataset svhn" in problems and "--method magic" in problems and "--subset 0.0" in problems
    assert any("warm-start or continual" in p for p in validate(RunConfig(protocol="fresh", method="head-reset")))
    assert any("--schedule linear" in p for p in validate(RunConfig(schedule="linear")))
    assert any("needs images" in p for p in validate(RunConfig(dataset="mnist1d", augment=True)))
    assert any("--seed -3: a seed must be an integer in [0, " in p for p in validate(RunConfig(seed=-3)))


TINY = RunConfig(dataset="digits", model="mlp", epochs=2, subset=0.5, noise=0.5, device="cpu", hessian=False)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "augment"] + ["augment"])
def test_every_method_trains_on_real_digits(method, tmp_path):
    config = replace(TINY, method=method)
    if method == "augment":
        config = replace(config, model="resnet18", epochs=1, subset=1.0, protocol="fresh", batch_size=512)
    result = run(config, out=tmp_path / "r.jsonl", log=lambda s: None)
    assert 0 <= result["test_acc"] <= 1 and np.isfinite(result["ece"]) and result["lipschitz"] > 0
    assert result["method"] == method
    phases = [h["phase"] for h in result["history"]]
    if config.protocol == "warm-start":
        assert phases.count("phase1") >= 1 and phases[-1] == "phase2"
        assert {"phase1", "end"} == set(result["diagnostics"])
        # measured from the weights at the start of training (not from the probe's own construction)
        moved = [result["diagnostics"][k]["distance_from_init/all"] for k in ("phase1", "end")]
        assert 0 < moved[0] and 0 < moved[1] and (method != "baseline" or moved[0] < moved[1])
    assert json.loads((tmp_path / "r.jsonl").read_text())["method"] == method


def test_head_reset_renews_the_head_and_it_learns_again():
    config = replace(TINY, method="head-reset", epochs=15, subset=1.0, noise=0.0, hessian=True)
    result = run(config, log=lambda s: None)
    phase2 = [h for h in result["history"] if h["phase"] == "phase2"]
    assert phase2[-1]["test_acc"] > 0.8 and phase2[-1]["train_acc"] > phase2[0]["train_acc"] - 0.05
    assert result["hessian"] is not None and np.isfinite(result["hessian"])


def test_cosine_schedule_with_augmentation_on_any_method():
    config = replace(TINY, model="mlp", protocol="fresh", method="ema", epochs=1, batch_size=512,
                     schedule="cosine", warmup=0.05, augment=True, hessian=True)  # fmt: skip
    result = run(config, log=lambda s: None)
    assert result["config"]["schedule"] == "cosine" and result["config"]["augment"] is True
    assert 0 <= result["test_acc"] <= 1
    assert np.isfinite(result["hessian"])  # measured on the EMA copy, whose parameters need no grad


def test_warm_start_phase_one_gets_equal_updates():
    lines = []
    result = run(replace(TINY, epochs=3, subset=0.25, log_every=4), log=lines.append)
    epochs = {p: [h["epoch"] for h in result["history"] if h["phase"] == p] for p in ("phase1", "phase2")}
    assert epochs == {"phase1": list(range(1, 13)), "phase2": [1, 2, 3]}  # 3 / 0.25; accuracies every epoch
    assert sum(line.startswith("phase1 epoch") for line in lines) == 3  # progress at 4, 8, 12
    assert result["data"][0]["size"] == round(0.25 * 1437)


def test_continual_chunks_with_falling_noise_and_a_buffer():
    result = run(replace(TINY, protocol="continual", chunks=4, epochs=1, buffer=100), log=lambda s: None)
    assert [r["noise"] for r in result["data"]] == pytest.approx([0.5, 1 / 3, 1 / 6, 0.0])
    assert [h["phase"] for h in result["history"]] == ["chunk0", "chunk1", "chunk2", "chunk3"]


def test_jsonl_append_keeps_earlier_lines_and_table_formats(tmp_path):
    """The table groups by (dataset, model, protocol, subset, noise) and by each method's settings:
    different settings are never averaged together."""
    path = tmp_path / "r.jsonl"
    common = {"dataset": "mnist1d", "model": "mlp", "subset": 0.1, "noise": 0.5, "mca": None}
    rows = [
        common | {"protocol": "warm-start", "method": "baseline", "test_acc": 0.5, "train_acc": 1.0, "ece": 0.1,
                  "hessian": 2.0, "lipschitz": 10.0, "config": {"lr": None, "seed": 0}},
        common | {"protocol": "warm-start", "method": "baseline", "test_acc": 0.7, "train_acc": 0.9, "ece": 0.2,
                  "hessian": 4.0, "lipschitz": 30.0, "config": {"lr": None, "seed": 1}},
        common | {"protocol": "warm-start", "method": "baseline", "test_acc": 0.9, "train_acc": 0.9, "ece": 0.2,
                  "hessian": 4.0, "lipschitz": 30.0, "config": {"lr": 0.01}},
        common | {"protocol": "warm-start", "method": "baseline", "test_acc": 0.2, "train_acc": 0.9, "ece": 0.2,
                  "hessian": 4.0, "lipschitz": 30.0, "subset": 0.5, "config": {}},
        common | {"protocol": "fresh", "method": "baseline", "test_acc": 0.8, "train_acc": 1.0, "ece": 0.1,
                  "hessian": 1.0, "lipschitz": 5.0},
    ]  # fmt: skip
    for row in rows:
        append_jsonl(path, row)
    assert read_jsonl(path) == rows
    script = str(ROOT / "scripts" / "supervised.py")
    table = subprocess.run([sys.executable, script, "table", str(path)], capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    out = table.stdout
    assert "### mnist1d / mlp — warm-start, subset 0.1, label noise 0.5" in out
    assert "| baseline | 60.00 ± 14.14 (2) | 95.00 ± 7.07 (2) |" in out
    assert "| baseline (lr=0.01) | 90.00 ± 0.00 (1) |" in out  # another setting: its own row
    assert "### mnist1d / mlp — warm-start, subset 0.5, label noise 0.5" in out  # another subset: its own table
    assert "### mnist1d / mlp — fresh" in out and "| baseline | 80.00 ± 0.00 (1) | 100.00 ± 0.00 (1) |" in out
    life = subprocess.run([sys.executable, script, "table", str(path), "--kind", "lifecycle"], capture_output=True,
                          text=True)  # fmt: skip
    assert (
        "| baseline | 60.00 ± 14.14 (2) | — | 15.00 ± 7.07 (2) | 3.00 ± 1.41 (2) | 20.00 ± 14.14 (2) |" in life.stdout
    )
    append_jsonl(path, rows[0] | {"config": {"lr": None, "seed": 0, "device": "cuda"}})  # seed 0 again, elsewhere
    again = subprocess.run([sys.executable, script, "table", str(path)], capture_output=True, text=True)
    assert "| baseline | 60.00 ± 14.14 (2) | 95.00 ± 7.07 (2) |" in again.stdout  # still two seeds, not three
    assert "1 line(s) repeat a run already read (the same settings and seed): counted once" in again.stderr
    with open(path, "a") as f:
        f.write('{"dataset": "mnist1d", "trunc\n')
    broken = subprocess.run([sys.executable, script, "table", str(path)], capture_output=True, text=True)
    assert broken.returncode == 2 and f"{path}:7: not a JSON line" in broken.stderr and "Traceback" not in broken.stderr


def test_a_run_already_in_out_is_not_run_again(tmp_path):
    """A script of runs restarted after a kill appends each run once: a second identical run (on
    any device, with any logging) returns the line already there instead of training again, so
    the table never counts one seed twice."""
    path, lines = tmp_path / "r.jsonl", []
    first = run(TINY, out=path, log=lambda s: None)
    again = run(replace(TINY, log_every=1, device="cpu"), out=path, log=lines.append)
    assert again == json.loads(path.read_text()) == json.loads(json.dumps(first))  # the line, read back
    assert len(path.read_text().splitlines()) == 1
    assert lines == [f"supervised: {path} already holds this run ({first['run_id']}, the same settings and seed): "
                     "not run again (another --out runs it anew)"]  # fmt: skip
    other_seed = run(replace(TINY, seed=TINY.seed + 1), out=path, log=lambda s: None)
    assert [row["run_id"] for row in read_jsonl(path)] == [first["run_id"], other_seed["run_id"]]
    # killed after its line was appended, before its checkpoint was removed: the checkpoint goes
    from rlplastic.supervised.train import checkpoint_file

    stale = checkpoint_file(replace(TINY, checkpoint_dir=str(tmp_path / "ckpt")))
    stale.parent.mkdir()
    stale.write_bytes(b"left behind")
    run(replace(TINY, checkpoint_dir=str(tmp_path / "ckpt")), out=path, log=lambda s: None)
    assert not stale.exists() and len(read_jsonl(path)) == 2


def test_cli_rejects_bad_input_before_work(tmp_path):
    script = str(ROOT / "scripts" / "supervised.py")
    bad = subprocess.run([sys.executable, script, "run", "--method", "magic", "--out", str(tmp_path / "o.jsonl")],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "'magic'" in bad.stderr and "--method" in bad.stderr
    assert not (tmp_path / "o.jsonl").exists()
    missing = subprocess.run([sys.executable, script, "run", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                              "--model", "resnet18", "--out", str(tmp_path / "o.jsonl")], capture_output=True,
                             text=True)  # fmt: skip
    assert missing.returncode == 2 and "cifar-10-batches-py/data_batch_1" in missing.stderr


def test_hare_tortoise_and_redo_periods_count_epochs_of_the_data_trained_on():
    """Lee et al. 2024: H&T resets every 10 epochs of the phase's data, so in warm-start phase 1 a
    subset epoch counts; ReDo recycles every 5 epochs (configurable)."""
    from rlplastic.interventions import HareTortoise, ReDo
    from rlplastic.supervised.data import load_dataset
    from rlplastic.supervised.train import Trainer

    data = load_dataset("digits", None)
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    subset = len(x) // 4
    config = replace(TINY, method="hare-tortoise", ht_reset_epochs=2, batch_size=64)
    trainer = Trainer(config, data, torch.device("cpu"))
    trainer.test_x, trainer.test_y = torch.as_tensor(data.x_test), torch.as_tensor(data.y_test)
    trainer.train(x[:subset], y[:subset], 4, "phase1", [], None, lambda s: None)
    (ht,) = [i for i in trainer.interventions if isinstance(i, HareTortoise)]
    assert ht.due.period == 2 * math.ceil(subset / 64) and ht.resets == 2  # 4 subset epochs / 2
    trainer.new_optimizer()
    trainer.train(x, y, 2, "phase2", [], None, lambda s: None)
    (ht,) = [i for i in trainer.interventions if isinstance(i, HareTortoise)]
    assert ht.due.period == 2 * math.ceil(len(x) / 64) and ht.resets == 1

    redo_config = replace(TINY, method="redo", redo_every_epochs=3, batch_size=64)
    trainer = Trainer(redo_config, data, torch.device("cpu"))
    trainer.test_x, trainer.test_y = torch.as_tensor(data.x_test), torch.as_tensor(data.y_test)
    trainer.train(x[:subset], y[:subset], 6, "phase1", [], None, lambda s: None)
    (redo,) = [i for i in trainer.interventions if isinstance(i, ReDo)]
    assert redo.due.period == 3 * math.ceil(subset / 64) and len(redo.recycled) == 2


@pytest.mark.slow
def test_vit_tiny_runs_with_its_diagnostics_and_hessian(tmp_path):
    """ViT's forward used len() (fx could not trace it for the probe) and fused attention has no
    second derivative (the Hessian failed): both crashed every vit-tiny run at its diagnostics."""
    config = replace(TINY, model="vit-tiny", protocol="fresh", epochs=1, hessian=True)
    result = run(config, out=tmp_path / "r.jsonl", log=lambda s: None)
    assert np.isfinite(result["hessian"]) and result["diagnostics"]["end"]["effective_rank/all"] > 0


def test_hare_tortoise_horizon_and_reset_share_scale_with_each_phase():
    """--ht-horizon / --ht-reset-share: the tortoise's EMA horizon 1/(1-momentum) and the reset
    period are shares of the phase's steps, so a short phase gets a short horizon."""
    from rlplastic.interventions import HareTortoise
    from rlplastic.supervised.data import load_dataset
    from rlplastic.supervised.train import Trainer

    data = load_dataset("digits", None)
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    config = replace(TINY, method="hare-tortoise", ht_horizon=0.1, ht_reset_share=0.25, batch_size=64)
    trainer = Trainer(config, data, torch.device("cpu"))
    trainer.test_x, trainer.test_y = torch.as_tensor(data.x_test), torch.as_tensor(data.y_test)
    for epochs in (4, 8):
        trainer.new_optimizer()
        trainer.train(x, y, epochs, "phase", [], None, lambda s: None)
        (ht,) = [i for i in trainer.interventions if isinstance(i, HareTortoise)]
        steps = epochs * math.ceil(len(x) / 64)
        assert 1 / (1 - ht.momentum) == pytest.approx(0.1 * steps)
        assert ht.due.period == round(0.25 * steps) and ht.resets == 4
    assert any("--ht-horizon 2" in p for p in validate(replace(config, ht_horizon=2.0)))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "resnet18", "vgg16", "vit-tiny", "wrn-28-4"])
def test_every_model_runs_every_method_for_an_epoch(model, tmp_path):
    """Each (model, method) the runner accepts trains, evaluates and measures its diagnostics on
    tiny CIFAR-10 files; the one it refuses (crelu beyond the MLP) is refused before any work."""
    write_cifar(tmp_path, 10)
    base = RunConfig(dataset="cifar10", data_dir=str(tmp_path), model=model, epochs=1, subset=0.5, batch_size=8,
                     device="cpu", hessian=False)  # fmt: skip
    for method in METHODS:
        config = replace(base, method=method)
        if method.startswith("lifecycle") and model in ("resnet18", "wrn-28-4"):
            config = replace(config, lc_layers="conv")  # no hidden fully connected layer
        if method == "crelu" and model != "mlp":
            assert any("crelu" in p for p in validate(config))
            continue
        result = run(config, out=tmp_path / "r.jsonl", log=lambda s: None)
        assert 0 <= result["test_acc"] <= 1 and np.isfinite(result["lipschitz"]), (model, method)
        end = result["diagnostics"]["end"]
        assert end["effective_rank/all"] > 0 and 0 <= end["saturated/all"] <= 1, (model, method)


def test_lifecycle_methods_flags_and_placement():
    """Lifecycle on the hidden fully connected layers by default (Yang 2025), gated after their
    BatchNorm; conv channels only on request; the paper's five ablations as presets of the
    revival / warm-up flags; contradictions and models without hidden FC layers refused."""
    from rlplastic.interventions import LifecycleConv2d, LifecycleLinear
    from rlplastic.supervised.data import load_dataset
    from rlplastic.supervised.train import LIFECYCLE_ABLATIONS, Trainer, lifecycle_settings

    data = load_dataset("digits", None)
    trainer = Trainer(replace(TINY, method="lifecycle-xavier-nowarmup", lc_lifespan=(7, 9)), data, torch.device("cpu"))
    layers = [m for m in trainer.model.modules() if isinstance(m, LifecycleLinear)]
    assert len(layers) == 2 and all(m.gated_after == "BatchNorm1d" for m in layers)
    assert all(m.revival == "xavier" and m.warmup == 1 and 7 <= m.lifespan.min() <= m.lifespan.max() <= 9
               for m in layers)  # fmt: skip
    assert lifecycle_settings(replace(TINY, method="lifecycle", lc_revival="he", lc_warmup=3)) == ("he", 3)
    assert set(LIFECYCLE_ABLATIONS) >= {"lifecycle-he-nowarmup", "lifecycle-xavier-nowarmup"}
    conv = Trainer(replace(TINY, model="resnet18", method="lifecycle", lc_layers="conv"), data, torch.device("cpu"))
    convs = [m for m in conv.model.modules() if isinstance(m, LifecycleConv2d)]
    assert len(convs) == 20 and all(m.gated_after == "BatchNorm2d" for m in convs)
    assert any("no hidden fully connected" in p for p in validate(replace(TINY, model="resnet18", method="lifecycle")))
    assert any("contradicts" in p for p in validate(replace(TINY, method="lifecycle-he", lc_revival="xavier")))
    assert any("--lc-lifespan 5 2" in p for p in validate(replace(TINY, method="lifecycle", lc_lifespan=(5, 2))))


def test_neuronal_decay_records_training_activations_only():
    """Evaluation forwards keep nothing (on ResNet-18 / CIFAR they used to pile up ~100 GB)."""
    from rlplastic.supervised.data import load_dataset
    from rlplastic.supervised.train import Trainer

    data = load_dataset("digits", None)
    trainer = Trainer(replace(TINY, method="neuronal-decay"), data, torch.device("cpu"))
    x = torch.as_tensor(data.x_train[:32])
    trainer.model.eval()
    with torch.no_grad():
        trainer.model(x)
    assert trainer.activations == []
    trainer.model.train()
    trainer.loss(x, torch.as_tensor(data.y_train[:32]))
    assert len(trainer.activations) == 2  # the MLP's two hidden ReLUs, once


class Killed(Exception):
    pass


@pytest.mark.parametrize("protocol", ["warm-start", "continual"])
def test_supervised_run_resumes_from_any_epoch_to_identical_results(protocol, tmp_path, monkeypatch):
    """Checkpoints every epoch; a run killed after any of them (or after its result reached the
    checkpoint but not the results file) finishes, run again, with the uninterrupted run's numbers
    and exactly one result line."""
    from rlplastic.supervised import train as strain

    config = replace(TINY, protocol=protocol, method="hare-tortoise", epochs=2, subset=0.5, chunks=2,
                     ht_reset_epochs=1, checkpoint_dir=str(tmp_path / "ckpt"))  # fmt: skip
    straight = run(replace(config, checkpoint_dir=None), out=tmp_path / "straight.jsonl", log=lambda s: None)
    real_save = strain.save_checkpoint
    saves = 7 if protocol == "warm-start" else 5  # epochs (4 + 2, or 2 + 2) and the finished result
    for kill_after in range(1, saves + 1):
        calls = []

        def save_then_die(path, payload, agent, calls=calls, kill_after=kill_after):
            real_save(path, payload, agent)
            calls.append(1)
            if len(calls) == kill_after:
                raise Killed

        out = tmp_path / f"out{kill_after}.jsonl"
        monkeypatch.setattr(strain, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            run(config, out=out, log=lambda s: None)
        monkeypatch.setattr(strain, "save_checkpoint", real_save)
        resumed = run(config, out=out, log=lambda s: None)
        for key in ("test_acc", "train_acc", "history", "diagnostics", "ece"):
            assert resumed[key] == straight[key], (kill_after, key)
        assert len(read_jsonl(out)) == 1 and not list((tmp_path / "ckpt").glob("*.pt"))


def test_supervised_nan_stops_the_run_without_a_result(tmp_path, monkeypatch):
    from rlplastic.supervised.train import Trainer

    real_loss = Trainer.loss
    monkeypatch.setattr(Trainer, "loss", lambda self, x, y: real_loss(self, x, y) * float("nan"))
    config = replace(TINY, protocol="fresh", checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(SystemExit, match="diverged in fresh epoch 1"):
        run(config, out=tmp_path / "r.jsonl", log=lambda s: None)
    assert not (tmp_path / "r.jsonl").exists()
    assert any("batch" in p for p in validate(config)) is False
    with pytest.raises(ValueError, match="--batch-size 5000: larger than the 1437 training samples"):
        run(replace(TINY, protocol="fresh", batch_size=5000), log=lambda s: None)


def test_a_supervised_checkpoint_carrying_code_is_refused_and_never_runs_it(tmp_path):
    from rlplastic.supervised.train import checkpoint_file

    config = replace(TINY, protocol="fresh", checkpoint_dir=str(tmp_path / "ckpt"))
    path = checkpoint_file(config)
    path.parent.mkdir()
    marker = tmp_path / "code_ran"
    torch.save({"config": {}, "payload": Planted(marker)}, path)
    with pytest.raises(SystemExit, match="is not a readable checkpoint.*move it away"):
        run(config, out=tmp_path / "r.jsonl", log=lambda s: None)
    assert not marker.exists() and not (tmp_path / "r.jsonl").exists()


@pytest.mark.slow
def test_bf16_autocast_and_channels_last_train_to_the_same_place():
    """The GPU speed options keep what is learned: bf16 autocast (the loss in float32) reaches the
    fp32 run's accuracy; the channels-last layout changes only the convolution kernels (the CPU's
    differ by 0.5% in the loss after an epoch of resnet18)."""
    quiet = dict(out=None, log=lambda *a: None)
    mlp = replace(TINY, epochs=10, protocol="fresh", seed=1)
    fp32, bf16 = run(mlp, **quiet), run(replace(mlp, amp="bf16"), **quiet)
    assert fp32["test_acc"] > 0.8 and bf16["test_acc"] == pytest.approx(fp32["test_acc"], abs=0.05)
    assert bf16["config"]["amp"] == "bf16"
    resnet = replace(TINY, model="resnet18", epochs=1, protocol="fresh", seed=1)
    plain, channels_last = run(resnet, **quiet), run(replace(resnet, channels_last=True), **quiet)
    assert channels_last["history"][-1]["loss"] == pytest.approx(plain["history"][-1]["loss"], rel=2e-2)


def test_compile_refuses_methods_that_hook_the_forward():
    problems = "\n".join(validate(replace(TINY, compile=True, method="lifecycle")))
    assert "--compile with --method lifecycle" in problems and "hare-tortoise" in problems
    assert validate(replace(TINY, compile=True, method="hare-tortoise")) == []


@pytest.mark.slow
def test_a_compiled_forward_trains_as_the_eager_one():
    base = replace(TINY, epochs=2, protocol="fresh", seed=2)
    eager = run(base, out=None, log=lambda *a: None)
    compiled = run(replace(base, compile=True), out=None, log=lambda *a: None)
    assert compiled["history"][-1]["loss"] == pytest.approx(eager["history"][-1]["loss"], rel=1e-3)


def test_cuda_graph_refuses_methods_that_hook_the_forward_and_is_off_on_a_cpu():
    problems = "\n".join(validate(replace(TINY, cuda_graph=True, method="redo")))
    assert "--cuda-graph with --method redo" in problems and "hare-tortoise" in problems
    assert validate(replace(TINY, cuda_graph=True, method="hare-tortoise")) == []
    base = replace(TINY, epochs=1, protocol="fresh", seed=3)
    eager, flagged = (run(config, out=None, log=lambda *a: None) for config in (base, replace(base, cuda_graph=True)))
    assert flagged["history"] == eager["history"] and flagged["config"]["cuda_graph"] is True


class EagerSteps:
    """rlplastic.cuda_graphs.CapturedSteps without the graph: step(key) called eagerly."""

    calls = 0

    def __init__(self, step, warmup=3, generators=()):
        self.step = step

    def __call__(self, key):
        EagerSteps.calls += 1
        return self.step(key)


def test_what_cuda_graph_changes_besides_the_capture_trains_as_the_eager_runner(tmp_path, monkeypatch):
    """--cuda-graph's plumbing, on the CPU with the capture replaced by an eager call: each batch's
    indices copied into a fixed tensor per batch size (the last batch of an epoch is smaller), the
    learning rate a tensor that the warm-up + cosine schedule fills in place, a capturable AdamW,
    and at a resume the checkpoint's learning rate put back on the device. The run must reproduce
    the eager runner's numbers exactly, killed after its first epoch or not."""
    from rlplastic.supervised import train as strain

    config = replace(TINY, protocol="warm-start", schedule="cosine", warmup=0.3, noise=0.0, augment=True,
                     batch_size=100, epochs=4)  # fmt: skip
    eager = run(config, out=None, log=lambda *a: None)
    assert any(n % 100 for n in (718, 1437))  # digits' halves: the last batch of an epoch is partial
    monkeypatch.setattr(strain, "graph_capture_available", lambda device: True)
    monkeypatch.setattr(strain, "CapturedSteps", EagerSteps)
    plumbed = run(replace(config, cuda_graph=True), out=None, log=lambda *a: None)
    # it learns (chance: 0.1); padded crops of 8x8 digits slow it down
    assert EagerSteps.calls > 0 and eager["history"][-1]["train_acc"] > 0.25
    same_numbers(plumbed, eager)

    real_save, saves = strain.save_checkpoint, []

    def save_then_die(path, payload, agent):
        real_save(path, payload, agent)
        saves.append(1)
        raise Killed

    resumable = replace(config, cuda_graph=True, checkpoint_dir=str(tmp_path / "ckpt"))
    monkeypatch.setattr(strain, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run(resumable, out=tmp_path / "r.jsonl", log=lambda s: None)
    monkeypatch.setattr(strain, "save_checkpoint", real_save)
    resumed = run(resumable, out=tmp_path / "r.jsonl", log=lambda s: None)
    assert saves == [1]
    same_numbers(resumed, eager)


def same_numbers(result: dict, reference: dict) -> None:
    """Equal up to float32 rounding: AdamW with its learning rate in a float32 tensor rounds the
    rate once more than with a Python float (1e-7 in the loss after a few epochs). An accuracy may
    then differ by a sample near the decision boundary (seen with one CPU thread: 1 of 718 training
    samples), so accuracies may differ by two samples of the smallest split (digits' 360 tests)."""
    assert len(result["history"]) == len(reference["history"])
    for row, ref in zip(result["history"], reference["history"], strict=True):
        assert row.keys() == ref.keys() and row["phase"] == ref["phase"] and row["epoch"] == ref["epoch"]
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-6), (row, ref)
        for key in ("train_acc", "test_acc"):
            assert row[key] == pytest.approx(ref[key], abs=2 / 360 + 1e-6), (key, row, ref)
    assert result["test_acc"] == pytest.approx(reference["test_acc"], abs=2 / 360 + 1e-6)
