"""The stability-gap protocol of Zhankov ("Decreasing Stability Gap with Neuronal Decay"): rotated
digits learned one rotation (task) after another by a plain MLP with replay of the earlier tasks,
every task's test accuracy evaluated after every batch (continual evaluation), and per earlier
task and later interval the gap depth (accuracy just before the switch minus the lowest accuracy
after it, in percentage points) and the time to recover (share of the interval's batches until
the accuracy is back within `tolerance` of its level before the switch; 100% if never).

Data: the real MNIST IDX files from `data_dir` when given, else scikit-learn's bundled 8x8 digits
(so it runs anywhere). Neuronal decay adds strength * the mean squared hidden activation to the
loss, on training forwards only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rlplastic.supervised.data import load_dataset
from rlplastic.supervised.train import record_hidden_activations

METHODS = ("baseline", "neuronal-decay")


@dataclass
class StabilityGapConfig:
    data_dir: str | None = None
    """folder with MNIST's IDX files (train-images-idx3-ubyte[.gz], ...); none: scikit-learn's digits"""
    angles: tuple[float, ...] = (0.0, 80.0, 160.0)
    """rotation of each task in degrees, in the order learned"""
    method: str = "baseline"
    """baseline or neuronal-decay"""
    strength: float = 0.01
    """neuronal decay: weight of the mean squared hidden activation"""
    replay: bool = True
    """replay: each batch of the current task is joined by as many samples of the earlier tasks"""
    hidden: tuple[int, ...] = (100, 100)
    epochs: int = 5
    """epochs per task"""
    batch_size: int = 32
    lr: float = 1e-3
    """Adam learning rate"""
    eval_samples: int = 1_000
    """test samples per task evaluated after every batch"""
    tolerance: float = 1.0
    """time to recover: accuracy back within this many percentage points of its level before the switch"""
    seed: int = 0
    device: str = "cpu"
    notes: dict = field(default_factory=dict)


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """(N, C, H, W) images rotated about their centre, bilinear, zeros outside."""
    if degrees == 0:
        return images
    theta = math.radians(degrees)
    matrix = torch.tensor([[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0]])
    grid = F.affine_grid(matrix.expand(len(images), 2, 3).to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def mlp(inputs: int, hidden: tuple[int, ...], classes: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for width in hidden:
        layers += [nn.Linear(inputs, width), nn.ReLU()]
        inputs = width
    return nn.Sequential(*layers, nn.Linear(inputs, classes))


def gap_metrics(curves: np.ndarray, boundaries: list[int], tolerance: float) -> dict[str, float]:
    """curves: (tasks, evaluations) accuracy in %, evaluation b after batch b; boundaries: the
    first evaluation of each interval (task). GD_{t,j} and TTR_{t,j} for every earlier task t and
    later interval j, 1-based as in the poster's table."""
    metrics = {}
    ends = boundaries[1:] + [curves.shape[1]]
    for j in range(1, len(boundaries)):
        start, end = boundaries[j], ends[j]
        for t in range(j):
            before = curves[t, start - 1]
            window = curves[t, start:end]
            metrics[f"GD_{t + 1},{j + 1}"] = max(0.0, float(before - window.min()))  # no dip: depth 0
            lowest = int(window.argmin())
            recovered = np.flatnonzero(window[lowest:] >= before - tolerance)
            steps = lowest + recovered[0] + 1 if len(recovered) else len(window)
            metrics[f"TTR_{t + 1},{j + 1}"] = float(100.0 * steps / len(window))
        metrics[f"ACC_AVG,{j + 1}"] = float(curves[: j + 1, end - 1].mean())
    metrics["ACC_AVG,1"] = float(curves[0, ends[0] - 1])
    return metrics


def run_stability_gap(config: StabilityGapConfig) -> dict:
    if config.method not in METHODS:
        raise ValueError(f"method {config.method!r}: allowed {', '.join(METHODS)}")
    if len(config.angles) < 2 or config.epochs < 1 or config.batch_size < 2:
        raise ValueError(f"angles {config.angles} / epochs {config.epochs} / batch size {config.batch_size}: need "
                         "2 or more tasks, epochs >= 1, batch size >= 2")  # fmt: skip
    data = load_dataset("mnist" if config.data_dir else "digits", config.data_dir)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    x_train, y_train = torch.as_tensor(data.x_train).to(device), torch.as_tensor(data.y_train).to(device)
    x_test, y_test = (
        torch.as_tensor(data.x_test[: config.eval_samples]).to(device),
        torch.as_tensor(data.y_test[: config.eval_samples]).to(device),
    )
    tasks = [(rotate(x_train, a), rotate(x_test, a)) for a in config.angles]
    model = mlp(int(np.prod(x_train.shape[1:])), config.hidden, data.num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    activations: list[torch.Tensor] = []
    record_hidden_activations(model, activations)  # training forwards only, as the supervised runner
    train_sets = torch.stack([task_x for task_x, _ in tasks])  # (tasks, N, ...): replay draws from it

    curves: list[list[torch.Tensor]] = [[] for _ in tasks]  # on the device; read once at the end
    boundaries = []
    n = len(x_train)
    for task, (task_x, _) in enumerate(tasks):
        boundaries.append(len(curves[0]))
        for _ in range(config.epochs):
            order = torch.randperm(n, device=device, generator=generator)
            for start in range(0, n - 1, config.batch_size):
                idx = order[start : start + config.batch_size]
                xb, yb = task_x[idx], y_train[idx]
                if config.replay and task > 0:  # as many samples again, from the earlier tasks
                    earlier = torch.randint(0, task, (len(idx),), device=device, generator=generator)
                    pick = torch.randint(0, n, (len(idx),), device=device, generator=generator)
                    old = train_sets[earlier, pick]
                    xb, yb = torch.cat([xb, old]), torch.cat([yb, y_train[pick]])
                model.train()
                activations.clear()
                loss = F.cross_entropy(model(xb), yb)
                if config.method == "neuronal-decay":
                    loss = loss + config.strength * torch.stack([a.pow(2).mean() for a in activations]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                model.eval()
                with torch.no_grad():  # continual evaluation: every task's accuracy after every batch
                    for curve, (_, test_x) in zip(curves, tasks, strict=True):
                        curve.append((model(test_x).argmax(1) == y_test).float().mean() * 100)
    curves_np = torch.stack([torch.stack(c) for c in curves]).cpu().numpy()
    return {
        "metrics": gap_metrics(curves_np, boundaries, config.tolerance),
        "curves": curves_np.round(3).tolist(),
        "boundaries": boundaries,
        "data": "mnist" if config.data_dir else "digits",
    }
