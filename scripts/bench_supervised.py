"""ResNet-18 training speed on CIFAR-shaped data on the current device: images/s and the time of
one 50,000-image epoch (batch 128, AdamW, crop + flip on the device, as the lifecycle tables train).

    python scripts/bench_supervised.py                  # auto device
    python scripts/bench_supervised.py --device cuda --batches 200
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro

from rlplastic.bench import device_name
from rlplastic.runs import resolve_device
from rlplastic.supervised.models import build_model
from rlplastic.supervised.train import crop_flip


@dataclass
class BenchArgs:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """device of the model and data"""
    batches: int = 0
    """timed batches; 0 = 5 on a CPU, 100 on a GPU"""
    batch_size: int = 128
    """images per batch"""
    model: str = "resnet18"
    """model to time (any of rlplastic.supervised.models.MODELS)"""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(bench: BenchArgs) -> None:
    device = resolve_device(bench.device)
    name = device_name(device)
    batches = bench.batches or (5 if device.type == "cpu" else 100)
    generator = torch.Generator(device=device).manual_seed(0)
    data = torch.randn(2_048, 3, 32, 32, device=device)  # resident on the device, as in the runner
    labels = torch.randint(0, 10, (2_048,), device=device)
    model = build_model(bench.model, (3, 32, 32), 10).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-4, fused=True)

    def step() -> torch.Tensor:
        idx = torch.randint(0, len(data), (bench.batch_size,), device=device, generator=generator)
        loss = F.cross_entropy(model(crop_flip(data[idx], generator)), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(2 if device.type == "cpu" else 10):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(batches):
        loss = step()
    loss.item()
    seconds = (time.perf_counter() - start) / batches
    images_per_s = bench.batch_size / seconds
    print(f"bench_supervised: {bench.model} on {device} ({name}), torch {torch.__version__}, batch {bench.batch_size}")
    print(f"{images_per_s:.1f} images/s ({seconds * 1000:.0f} ms per batch); one 50,000-image CIFAR epoch: "
          f"{50_000 / images_per_s / 60:.1f} min; 100 epochs: {100 * 50_000 / images_per_s / 3600:.1f} h")  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
