"""ResNet-18 training speed on CIFAR-shaped data on the current device: images/s and the time of
one 50,000-image epoch (batch 128, crop + flip on the device, as the lifecycle tables train), for
each of the runner's speed options (scripts/supervised.py --amp bf16, --channels-last, --compile,
--cuda-graph) alone and together. What it times is the runner's own training step
(rlplastic.supervised.train.Trainer.stepper: gather, crop + flip, forward, loss, backward, gradient
clipping, AdamW, with the run's defaults), on random CIFAR-shaped data resident on the device; the
learning-rate schedule between steps is left out. A variant with `graph` captures that step in a
CUDA graph, as --cuda-graph does; it needs CUDA and is skipped on a CPU.

    python scripts/bench_supervised.py                  # auto device, every variant
    python scripts/bench_supervised.py --device cuda --batches 200 --variants fp32 bf16+channels-last+graph
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import tyro

from rlplastic.bench import device_name
from rlplastic.cuda_graphs import graph_capture_available
from rlplastic.machine import resolve_device
from rlplastic.supervised.data import Dataset
from rlplastic.supervised.train import RunConfig, Trainer

OPTIONS = ("bf16", "channels-last", "compile", "graph")


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
    variants: tuple[str, ...] = ("fp32", "bf16", "channels-last", "bf16+channels-last", "compile", "graph",
                                 "bf16+channels-last+graph")  # fmt: skip
    """speed options to time, each fp32 or a +-joined set of bf16, channels-last, compile, graph"""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cifar_shaped(samples: int = 2_048, seed: int = 0) -> Dataset:
    """Random CIFAR-10-shaped images and labels (the speed of a step does not depend on the pixels)."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((samples, 3, 32, 32), dtype=np.float32)
    labels = rng.integers(0, 10, samples)
    return Dataset("cifar-shaped", images, labels, images[:256], labels[:256], 10)


def time_variant(bench: BenchArgs, variant: str, device: torch.device, batches: int) -> float:
    """Seconds per training batch of the runner's step with the options of `variant`."""
    options = set(variant.split("+")) - {"fp32"}
    unknown = options - set(OPTIONS)
    if unknown:
        raise SystemExit(f"bench_supervised: unknown variant part(s) {sorted(unknown)}; allowed fp32 or "
                         f"{', '.join(OPTIONS)} joined by +")  # fmt: skip
    torch.manual_seed(0)
    config = RunConfig(model=bench.model, batch_size=bench.batch_size, augment=True, device=device.type,
                       amp="bf16" if "bf16" in options else "fp32", channels_last="channels-last" in options,
                       compile="compile" in options, cuda_graph="graph" in options)  # fmt: skip
    data = cifar_shaped()
    trainer = Trainer(config, data, device)
    x, y = torch.as_tensor(data.x_train, device=device), torch.as_tensor(data.y_train, device=device)
    trainer.model.train()
    step = trainer.stepper(x, y, augment=True)
    indices = torch.randint(0, len(x), (max(batches, 10), bench.batch_size), device=device, generator=trainer.generator)
    for idx in indices[: 2 if device.type == "cpu" else 10]:  # compile and capture happen here
        step(idx)
    synchronize(device)
    start = time.perf_counter()
    for idx in indices[:batches]:
        loss = step(idx)
    loss.item()
    return (time.perf_counter() - start) / batches


def main(bench: BenchArgs) -> None:
    device = resolve_device(bench.device)
    batches = bench.batches or (5 if device.type == "cpu" else 100)
    print(f"bench_supervised: {bench.model} on {device} ({device_name(device)}), torch {torch.__version__}, "
          f"batch {bench.batch_size}")  # fmt: skip
    for variant in bench.variants:
        if "graph" in variant.split("+") and not graph_capture_available(device):
            print(f"{variant:20s} skipped: CUDA graphs need a CUDA device", flush=True)
            continue
        seconds = time_variant(bench, variant, device, batches)
        images_per_s = bench.batch_size / seconds
        print(f"{variant:20s} {images_per_s:9.1f} images/s ({seconds * 1000:.0f} ms per batch); one 50,000-image "
              f"epoch: {50_000 / images_per_s / 60:.1f} min; 100 epochs: {100 * 50_000 / images_per_s / 3600:.1f} h",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
