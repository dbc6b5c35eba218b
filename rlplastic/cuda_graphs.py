"""Whole training steps captured once in a CUDA graph and replayed (PyTorch's CUDA Graphs).

A DrQ update is a few hundred small kernels: on a GPU the launches, not the arithmetic, set its
time. Capturing the whole step (replay sampling, augmentation, forward, backward, optimizer step,
the interventions' per-step work) once and replaying it removes the launches and the Python.

    step = CapturedStep(train_step, generators=[generator])   # train_step() -> tensors
    for ...:
        loss = step()          # eager for the first `warmup` calls, then one graph replay each

What a captured step needs, and the agents provide:
- fixed shapes and no host syncs (no .item(), no Python decision on a tensor's value);
- inputs read from tensors that are updated in place (replay storage, its sampleable mask);
- random numbers from generators registered with the graph (each replay draws fresh numbers);
- an optimizer built with capturable=True (its step count lives on the device);
- rare events outside the graph that change parameters and optimizer state in place
  (rlplastic.interventions' host_step), so the graph never has to be captured again.
The outputs of a replay are the same tensors every time: read or accumulate them before the next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")


class CapturedStep(Generic[T]):
    """Call `step` eagerly `warmup` times (on a side stream, as capture requires), then capture it
    once and replay the graph on every later call. The call that captures also replays, so every
    call performs exactly one step."""

    def __init__(self, step: Callable[[], T], warmup: int = 3, generators: Sequence[torch.Generator] = ()):
        if warmup < 1:
            raise ValueError(f"warmup {warmup}: must be >= 1 (the optimizer state must exist before capture)")
        self.step, self.warmup, self.generators = step, warmup, list(generators)
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: T | None = None

    def __call__(self) -> T:
        self.calls += 1
        if self.graph is None and self.calls > self.warmup:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = self.step()
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            self.outputs = self.step()
        self.graph = graph


def graph_capture_available(device: torch.device) -> bool:
    """CUDA graphs need a CUDA device and graph-safe custom generators (torch >= 2.5)."""
    return device.type == "cuda" and hasattr(torch.cuda.CUDAGraph(), "register_generator_state")


class CapturedSteps(Generic[T]):
    """One CapturedStep per key, for a step whose shapes depend on a host value that takes a few
    values (BBF's annealed n): steps(key) runs step(key), captured the first time a key comes."""

    def __init__(self, step: Callable[[Any], T], warmup: int = 3, generators: Sequence[torch.Generator] = ()):
        self.step, self.warmup, self.generators = step, warmup, list(generators)
        self.captured: dict[Any, CapturedStep[T]] = {}

    def __call__(self, key: Any) -> T:
        if key not in self.captured:
            self.captured[key] = CapturedStep(lambda: self.step(key), self.warmup, self.generators)
        return self.captured[key]()


class ConcurrentSteps:
    """Independent steps (one per run: its own parameters, optimizer, replay, generator) side by
    side. On CUDA each is captured in its own graph (its own memory pool) and the replays are
    spread over a pool of streams, so the GPU runs them at once: one launch-bound update leaves
    most of the GPU idle, N of them together fill it. Without capture they run one after another,
    each exactly as it runs alone.

        steps = ConcurrentSteps([run_1_step, ..., run_n_step], generators=[g_1, ..., g_n])
        steps()   # every run's step; later work on the current stream waits for all of them
    """

    def __init__(
        self, steps: Sequence[Callable[[], object]], generators: Sequence[torch.Generator], capture: bool = True,
        streams: int = 8,
    ):  # fmt: skip
        if capture:
            self.steps = [CapturedStep(s, generators=[g]) for s, g in zip(steps, generators, strict=True)]
            self.streams = [torch.cuda.Stream() for _ in range(min(streams, len(steps)))]
        else:
            self.steps, self.streams = list(steps), []

    def __call__(self) -> None:
        if not self.streams:
            for step in self.steps:
                step()
            return
        main = torch.cuda.current_stream()
        for stream in self.streams:
            stream.wait_stream(main)  # the steps read what the main stream wrote (replay, parameters)
        for i, step in enumerate(self.steps):
            with torch.cuda.stream(self.streams[i % len(self.streams)]):
                step()
        for stream in self.streams:
            main.wait_stream(stream)
