"""DrQ update time with and without each intervention at its default schedule, in one run.

    python scripts/bench_interventions.py [--device cpu|cuda] [--updates 30]

For each intervention: the mean time of (update + every intervention's step()) over `updates`
updates, against plain DrQ; on CUDA also with the update and the interventions' device_step()
captured in one CUDA graph (host_step() after each replay), as the agents run it. Rare events (a
head reset every 20k steps, a ReDo pass every 1k) would not occur in a short measurement, so each
one is also timed when forced and amortized over its period: overhead = (per-step cost + event
cost / period) / plain update time. Goal: <= 3% (on a GPU, of the captured update).

The "ops" column counts the tensor operators of one update with its interventions' device work
(rlplastic.bench.DeviceOpCounter): on a GPU each is a kernel (a node of the captured graph), so it
shows the launch overhead an intervention adds on any machine, a CPU included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

from rlplastic.agent_files import load_agent
from rlplastic.bench import DeviceOpCounter, device_name, random_replay, synchronize, time_steps
from rlplastic.cli import replace_flags
from rlplastic.cuda_graphs import CapturedStep, graph_capture_available
from rlplastic.init import xavier_uniform_zero_bias
from rlplastic.interventions import build_interventions
from rlplastic.machine import device_generator, resolve_device
from rlplastic.replay import FrameReplay

drq = load_agent("drq")


@dataclass
class BenchArgs:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """device of the network and replay"""
    updates: int = 30
    """timed updates per configuration"""
    repeats: int = 5
    """interleaved repetitions; the fastest is reported, since interference only ever adds time"""
    only: tuple[str, ...] = ()
    """time only the configurations whose label contains one of these texts (e.g. backprop), and the
    ones they are measured against; all by default"""


# label: (overrides, the configuration it adds to)
CONFIGS = {
    "plain DrQ": ({}, "plain DrQ"),
    "EMA target (tau 0.005)": ({"ema": 0.995}, "plain DrQ"),
    "hare-tortoise (reset/4k)": ({"ema": 0.995, "reset": ("hare-tortoise",)}, "EMA target (tau 0.005)"),
    "head reset /20k": ({"reset": ("head",)}, "plain DrQ"),
    "shrink-perturb /20k": ({"reset": ("shrink-perturb",)}, "plain DrQ"),
    "redo /1k": ({"reset": ("redo",)}, "plain DrQ"),
    "continual backprop": ({"continual": ("cbp",)}, "plain DrQ"),
    "gradient noise": ({"continual": ("noise",)}, "plain DrQ"),
    "lifecycle layers": ({"continual": ("lifecycle",)}, "plain DrQ"),
}


def build(args: drq.Args, device: torch.device, replay: FrameReplay):
    q, target, optimizer = drq.build_learner(args, 4, device)
    ema = None if target is q else target
    interventions = build_interventions(args.interventions, q, ema, optimizer, lambda n: replay.sample(n).states,
                                        xavier_uniform_zero_bias, drq.HEAD_MODULES)  # fmt: skip
    return q, target, optimizer, interventions


def update_seconds(args, device, replay, generator, updates, graph: bool = False) -> float:
    """Seconds per DrQ update followed by its interventions' step; graph=True: the update and the
    interventions' device work captured in a CUDA graph, their host_step() after each replay."""
    q, target, optimizer, interventions = build(args, device, replay)

    def device_work() -> torch.Tensor:
        loss = drq.update(args, q, target, optimizer, replay, generator)["td_loss"]
        interventions.device_step()
        return loss

    captured = CapturedStep(device_work, generators=[generator]) if graph else device_work

    def step() -> torch.Tensor:
        loss = captured()
        interventions.host_step()
        return loss

    return time_steps(step, updates, device, warmup=4)  # graph: 3 eager steps, then the capture


def device_ops(args, device, replay, generator) -> int:
    """Tensor operators (kernels on a GPU) of one update followed by its interventions' device
    work, after a few updates (state allocated, hooks fed)."""
    q, target, optimizer, interventions = build(args, device, replay)
    for _ in range(3):
        drq.update(args, q, target, optimizer, replay, generator)
        interventions.step()
    with DeviceOpCounter() as ops:
        drq.update(args, q, target, optimizer, replay, generator)
        interventions.device_step()
    return ops.total


def event_cost(args, device, replay, generator) -> tuple[float, int]:
    """Seconds of one scheduled event (reset, recycling pass) and its period; (0, 0) if none."""
    q, target, optimizer, interventions = build(args, device, replay)
    drq.update(args, q, target, optimizer, replay, generator)
    for intervention in interventions:
        period = getattr(getattr(intervention, "due", None), "period", 0)
        if period:
            action = intervention.reset_hare if hasattr(intervention, "reset_hare") else intervention.apply
            if hasattr(intervention, "batch_fn"):
                action = lambda iv=intervention: iv.apply(iv.batch_fn())  # noqa: E731
            action()  # warm-up (fx trace, allocations)
            synchronize(device)
            start = time.perf_counter()
            action()
            synchronize(device)
            return time.perf_counter() - start, period
    return 0.0, 0


def main(bench: BenchArgs) -> None:
    device = resolve_device(bench.device)
    name = device_name(device)
    print(f"bench_interventions: DrQ update (batch 32) on {device} ({name}), torch {torch.__version__}")
    generator = device_generator(device, 0)
    replay = random_replay(FrameReplay(5_000, 10, 0.99, device=device, generator=generator), num_actions=4)
    base = replace_flags(drq.Args(), device=bench.device)
    modes = ["eager", "cuda-graph"] if graph_capture_available(device) else ["eager"]
    chosen = {label for label in CONFIGS if not bench.only or any(text in label for text in bench.only)}
    configs = {label: config for label, config in CONFIGS.items()
               if label in chosen or any(CONFIGS[c][1] == label for c in chosen)}  # fmt: skip
    if not chosen:
        raise SystemExit(f"bench_interventions: --only {' '.join(bench.only)} matches none of: {', '.join(CONFIGS)}")
    ops = {label: device_ops(replace_flags(base, **overrides), device, replay, generator)
           for label, (overrides, _) in configs.items()}  # fmt: skip
    for mode in modes:
        times: dict[str, list[float]] = {label: [] for label in configs}
        for _ in range(bench.repeats):  # interleaved, so drifts in machine load hit every config alike
            for label, (overrides, _) in configs.items():
                args = replace_flags(base, **overrides)
                times[label].append(update_seconds(args, device, replay, generator, bench.updates, mode != "eager"))
        fastest = {label: min(values) for label, values in times.items()}
        print(f"{mode} update: {'configuration':26s} {'ms/update':>10s} {'event ms':>9s} {'period':>7s} "
              f"{'overhead':>9s} {'ops':>5s} {'+ops':>5s}  vs")  # fmt: skip
        for label, (overrides, baseline) in configs.items():
            event, period = event_cost(replace_flags(base, **overrides), device, replay, generator)
            amortized = fastest[label] + (event / period if period else 0.0)
            overhead = 100 * (amortized / fastest[baseline] - 1)
            event_text = f"{1000 * event:9.1f}" if period else f"{'-':>9s}"
            period_text = f"{period:7d}" if period else f"{'-':>7s}"
            print(f"{mode} update: {label:26s} {1000 * fastest[label]:10.2f} {event_text} {period_text} "
                  f"{overhead:+8.1f}% {ops[label]:5d} {ops[label] - ops[baseline]:+5d}  {baseline}")  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
