"""ResNet-18 training speed on CIFAR-shaped data on the current device: images/s and the time of
one 50,000-image epoch (batch 128, AdamW, crop + flip on the device, as the lifecycle tables train),
for each of the runner's speed options (scripts/supervised.py --amp bf16, --channels-last,
--compile, --cuda-graph) alone and together. A variant with `graph` captures the whole training
step (sampling, augmentation, forward, backward, AdamW) in a CUDA graph, as --cuda-graph does; it
needs CUDA and is skipped on a CPU.

    python scripts/bench_supervised.py                  # auto device, every variant
    python scripts/bench_supervised.py --device cuda --batches 200 --variants fp32 bf16+channels-last+graph
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro

from rlplastic.bench import device_name
from rlplastic.cuda_graphs import CapturedStep, graph_capture_available
from rlplastic.runs import resolve_device
from rlplastic.supervised.models import build_model
from rlplastic.supervised.train import crop_flip

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


def time_variant(bench: BenchArgs, variant: str, device: torch.device, batches: int) -> float:
    """Seconds per training batch with the options of `variant`."""
    options = set(variant.split("+")) - {"fp32"}
    unknown = options - set(OPTIONS)
    if unknown:
        raise SystemExit(f"bench_supervised: unknown variant part(s) {sorted(unknown)}; allowed fp32 or "
                         f"{', '.join(OPTIONS)} joined by +")  # fmt: skip
    torch.manual_seed(0)
    generator = torch.Generator(device=device).manual_seed(0)
    data = torch.randn(2_048, 3, 32, 32, device=device)  # resident on the device, as in the runner
    labels = torch.randint(0, 10, (2_048,), device=device)
    model = build_model(bench.model, (3, 32, 32), 10).to(device)
    layout = torch.channels_last if "channels-last" in options else torch.contiguous_format
    model.to(memory_format=layout)
    forward = torch.compile(model) if "compile" in options else model
    graphed = "graph" in options
    lr = torch.tensor(1e-3, device=device) if graphed else 1e-3  # as the runner builds it
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4, fused=True, capturable=graphed)

    def step() -> torch.Tensor:
        idx = torch.randint(0, len(data), (bench.batch_size,), device=device, generator=generator)
        x = crop_flip(data[idx], generator).contiguous(memory_format=layout)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in options):
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    if graphed:
        step = CapturedStep(step, generators=[generator])
    for _ in range(2 if device.type == "cpu" else 10):  # compile and capture happen here
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(batches):
        loss = step()
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
