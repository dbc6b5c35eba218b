"""Uniform n-step replay of uint8 frames stored once, living on the training device.

Slot t holds the newest frame of state s_t, the action a_t, the (clipped) reward r_t and
whether s_{t+1} is terminal for learning. A state is rebuilt from the last `stack` frames;
frames from before a segment start (episode start or life loss) read as zeros, which is exactly
the zero-filled stack the environment hands the agent. One 84x84 frame per step instead of
two 4x84x84 stacks: 8x less memory, so 100k steps take 0.7 GB and sit on the GPU.

Which slots may be sampled is tracked on the host (where the flags arrive anyway) and written
into a device mask, so sampling never synchronizes with the device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from rlplastic.machine import memory_problem, resolve_device

STAGING_SLOTS = 64
DEVICE_FIELDS = ("frames", "actions", "rewards", "terminals", "segment_pos", "sampleable")


@dataclass
class Batch:
    states: torch.Tensor  # (B, stack, H, W) uint8
    actions: torch.Tensor  # (B,) int64
    returns: torch.Tensor  # (B,) float32, discounted n-step sum of rewards
    discounts: torch.Tensor  # (B,) float32, gamma^n, or 0 where a terminal cut the window
    next_states: torch.Tensor  # (B, stack, H, W) uint8, the state n steps later
    indices: torch.Tensor  # (B,) int64 slots, for prioritized variants


class TransitionReader(ABC):
    """Sampling slots and reading n-step transitions out of the replay's device tensors, for any
    leading shape: FrameReplay reads its own (slots (B,)), StackedFrameReplays every run's at once
    (slots (N, B)), with the same arithmetic. Needs capacity, n_step, gamma, stack,
    discount_powers, device, the sampleable mask, and _at(name, index)."""

    capacity: int
    n_step: int
    gamma: float
    stack: int
    discount_powers: torch.Tensor
    device: torch.device
    sampleable: torch.Tensor  # (..., capacity) float 0/1

    @abstractmethod
    def _at(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """The named device tensor (frames, actions, ...) at `index`, slots of the leading shape."""

    def slots_for(self, draws: torch.Tensor) -> torch.Tensor:
        """Uniform draws in [0, 1), (..., B) -> sampleable slots, by inverting the mask's running
        count: device-only work of fixed shape, so an update that samples can be captured in a CUDA
        graph and replayed while the mask changes (the mask is updated in place)."""
        counts = torch.cumsum(self.sampleable, -1)  # exact: float32 counts integers up to 2^24
        return torch.searchsorted(counts, draws * counts[..., -1:], right=True)

    def states_at(self, slots: torch.Tensor) -> torch.Tensor:
        """(...) slots -> (..., stack, H, W) uint8 stacks, zeros before each segment start."""
        offsets = torch.arange(self.stack - 1, -1, -1, device=self.device)  # oldest first
        frame_slots = (slots[..., None] - offsets) % self.capacity
        visible = offsets <= self._at("segment_pos", slots)[..., None]
        return self._at("frames", frame_slots) * visible[..., None, None].to(torch.uint8)

    def transitions(
        self, slots: torch.Tensor, n_step: int | None = None, gamma: float | torch.Tensor | None = None
    ) -> Batch:
        """The n-step transitions starting at `slots` (which must be sampleable). n_step (at most
        the capacity's n_step) and gamma may be given per call, for agents that anneal them; gamma
        may be a 0-dim device tensor, changed in place between calls (a CUDA-graph-captured update)."""
        n_step = self.n_step if n_step is None else n_step
        if not 1 <= n_step <= self.n_step:
            raise ValueError(f"n_step {n_step}: must lie in 1..{self.n_step} (the replay's n_step)")
        # a device gamma is never compared on the host (that would sync): it takes the general path
        if gamma is None or (not torch.is_tensor(gamma) and gamma == self.gamma and n_step == self.n_step):
            powers, gamma_n = self.discount_powers[:n_step], self.gamma**n_step
        else:
            powers, gamma_n = gamma ** torch.arange(n_step, dtype=torch.float32, device=self.device), gamma**n_step
        window = (slots[..., None] + torch.arange(n_step, device=self.device)) % self.capacity
        terminals = self._at("terminals", window)
        # alive[k] = no terminal among steps 0..k-1: reward k still belongs to the episode
        alive = torch.cumprod(torch.cat([torch.ones_like(terminals[..., :1]), 1 - terminals[..., :-1]], -1), -1)
        returns = (self._at("rewards", window) * alive * powers).sum(-1)
        discounts = gamma_n * alive[..., -1] * (1 - terminals[..., -1])
        next_slots = (slots + n_step) % self.capacity
        return Batch(
            states=self.states_at(slots),
            actions=self._at("actions", slots),
            returns=returns,
            discounts=discounts,
            next_states=self.states_at(next_slots),
            indices=slots,
        )


# Beside its replay a run holds its networks, their gradients and optimizer state and an update's
# activations (DrQ with 18 actions: 4.1M parameters, 65 MB for weights, gradients and Adam's two
# moments), and the process holds torch and its emulators: a refusal counts these too, so that a
# batch of runs that only just fits its replays is refused with a message, not killed by the OS.
LEARNER_BYTES = 128 * 2**20
PROCESS_BYTES = 2**30


class FrameReplay(TransitionReader):
    @staticmethod
    def memory_bytes(capacity: int, frame_shape: tuple[int, int] = (84, 84), prioritized: bool = False) -> int:
        """What a replay of `capacity` slots holds on its device: a uint8 frame plus action, reward,
        terminal, segment position and sampleable flag per slot (and a priority when prioritized)."""
        per_slot = frame_shape[0] * frame_shape[1] + 8 + 4 + 4 + 8 + 4 + (4 if prioritized else 0)
        return capacity * per_slot

    @classmethod
    def problems(cls, capacity: int, batch_size: int, n_step: int, device: str, prioritized: bool = False) -> list[str]:
        """What is wrong with a replay of these sizes (--buffer-size, --batch-size, the largest n of
        the n-step return) on `device`, or where it would not fit in the device's free memory."""
        sizes = (("buffer-size", capacity), ("batch-size", batch_size))
        problems = [f"--{name} {value}: must be a positive integer" for name, value in sizes if value <= 0]
        if batch_size > capacity:
            problems.append(f"--batch-size {batch_size}: larger than the replay (--buffer-size {capacity})")
        if capacity <= n_step + 4:
            problems.append(f"--buffer-size {capacity}: must exceed the n-step's n + 4 = {n_step + 4}")
        return problems or cls.memory_problems(capacity, device, prioritized=prioritized)

    @classmethod
    def memory_problems(cls, capacity: int, device: str, runs: int = 1, prioritized: bool = False) -> list[str]:
        """A refusal when `runs` replays of `capacity` slots (one per run of a process) would not fit
        in the free memory of `device` together with what else the process holds, else none."""
        if device not in ("auto", "cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
            return []
        needed = runs * (cls.memory_bytes(capacity, prioritized=prioritized) + LEARNER_BYTES) + PROCESS_BYTES
        what = f"--buffer-size {capacity} (the replay)" + (f" x {runs} runs in one process" if runs > 1 else "")
        what += f" with {'their' if runs > 1 else 'its'} networks and the process"
        problem = memory_problem(needed, resolve_device(device), what)
        return [problem] if problem else []

    @staticmethod
    def allocate(
        capacity: int, frame_shape: tuple[int, int], device: torch.device, runs: tuple[int, ...] = ()
    ) -> dict[str, torch.Tensor]:
        """Zeroed device tensors for the contents of `capacity` slots (with leading dims `runs`)."""
        dtypes = {"frames": torch.uint8, "actions": torch.int64, "rewards": torch.float32,
                  "terminals": torch.float32, "segment_pos": torch.int64, "sampleable": torch.float32}  # fmt: skip
        return {name: torch.zeros((*runs, capacity, *(frame_shape if name == "frames" else ())), dtype=dtypes[name],
                                  device=device) for name in DEVICE_FIELDS}  # fmt: skip

    def __init__(
        self,
        capacity: int,
        n_step: int,
        gamma: float,
        frame_shape: tuple[int, int] = (84, 84),
        stack: int = 4,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        storage: dict[str, torch.Tensor] | None = None,
    ):
        """storage: the device tensors to hold the contents (allocate()'s), e.g. a run's views of
        StackedFrameReplays' stacked tensors; by default its own zeroed ones."""
        if capacity <= n_step + stack:
            raise ValueError(f"replay capacity {capacity} must exceed n_step + stack = {n_step + stack}")
        self.capacity, self.n_step, self.gamma, self.stack = capacity, n_step, gamma, stack
        self.device = torch.device(device)
        self.generator = generator
        storage = storage if storage is not None else self.allocate(capacity, frame_shape, self.device)
        # frames, actions, rewards, terminals; segment_pos: frames of the same segment before slot t,
        # capped at stack-1 (0 means "first frame"); sampleable: the device mask of sampleable slots
        for name in DEVICE_FIELDS:
            setattr(self, name, storage[name])
        self._sampleable_host = np.zeros(capacity, dtype=bool)  # mirror, read without a device sync
        self.discount_powers = gamma ** torch.arange(n_step, dtype=torch.float32, device=self.device)
        self.gamma_n = gamma**n_step
        if self.device.type == "cuda":
            # Frames reach the GPU through a pinned ring, so the copy is truly asynchronous and
            # never waits behind an update queued on the stream; an event guards each slot's reuse.
            self._staging = torch.empty((STAGING_SLOTS, *frame_shape), dtype=torch.uint8, pin_memory=True)
            self._staging_done = [torch.cuda.Event() for _ in range(STAGING_SLOTS)]
        self.head = 0  # next slot to write
        self.size = 0
        self.num_sampleable = 0
        self._next_segment_pos = 0
        # (terminal, truncated) of the last n_step slots written, oldest first
        self._recent_flags: deque[tuple[bool, bool]] = deque(maxlen=n_step)

    def __len__(self) -> int:
        return self.size

    def add(self, frame: np.ndarray | torch.Tensor, action: int, reward: float, terminal: bool, truncated: bool):
        """Store one step: the newest frame of s_t, a_t, r_t, and how the step ended.

        terminal: s_{t+1} is terminal for learning (game over or life loss): no bootstrap.
        truncated: the episode was cut (step cap) without a terminal: the window cannot bootstrap
        from a state that was never stored, so slots whose n-step window reaches it are not sampled.
        """
        t = self.head
        self._write_frame(t, torch.as_tensor(frame))
        self.actions[t] = action
        self.rewards[t] = reward
        self.terminals[t] = float(terminal)
        self.segment_pos[t] = self._next_segment_pos
        self._next_segment_pos = 0 if (terminal or truncated) else min(self._next_segment_pos + 1, self.stack - 1)

        # Overwriting slot t breaks the stacks of the slots that read it as an older frame.
        for k in range(self.stack):
            self._set_sampleable((t + k) % self.capacity, False)
        # Slot t - n now has all it needs: rewards t-n..t-1 and the bootstrap state s_t, unless
        # a truncation cut its window before any terminal. The deque holds slots t-n..t-1.
        if len(self._recent_flags) == self.n_step:
            self._set_sampleable((t - self.n_step) % self.capacity, self._window_is_complete())
        self._recent_flags.append((terminal, truncated))
        self.head = (t + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def state_dict(self) -> dict:
        """Contents and write position, for resumable runs (frames only up to `size`)."""
        return {
            "frames": self.frames[: self.size].cpu(),
            "actions": self.actions[: self.size].cpu(),
            "rewards": self.rewards[: self.size].cpu(),
            "terminals": self.terminals[: self.size].cpu(),
            "segment_pos": self.segment_pos[: self.size].cpu(),
            "sampleable": self._sampleable_host[: self.size].copy(),
            "head": self.head,
            "size": self.size,
            "next_segment_pos": self._next_segment_pos,
            "recent_flags": list(self._recent_flags),
        }

    def load_state_dict(self, state: dict) -> None:
        size = state["size"]
        for name in ("frames", "actions", "rewards", "terminals", "segment_pos"):
            getattr(self, name)[:size].copy_(state[name])
        self._sampleable_host[:size] = state["sampleable"]
        self.sampleable[:size] = torch.as_tensor(state["sampleable"], dtype=torch.float32)
        self.num_sampleable = int(self._sampleable_host.sum())
        self.head, self.size = state["head"], size
        self._next_segment_pos = state["next_segment_pos"]
        self._recent_flags = deque(state["recent_flags"], maxlen=self.n_step)

    def _write_frame(self, slot: int, frame: torch.Tensor) -> None:
        if self.device.type != "cuda":
            self.frames[slot].copy_(frame)
            return
        k = slot % STAGING_SLOTS
        self._staging_done[k].synchronize()  # long finished in practice: STAGING_SLOTS steps ago
        self._staging[k].copy_(frame)
        self.frames[slot].copy_(self._staging[k], non_blocking=True)
        self._staging_done[k].record()

    def _window_is_complete(self) -> bool:
        for terminal, truncated in self._recent_flags:
            if terminal:
                return True
            if truncated:
                return False
        return True

    def _set_sampleable(self, slot: int, value: bool):
        if self._sampleable_host[slot] != value:
            self.num_sampleable += 1 if value else -1
            self._sampleable_host[slot] = value
            self.sampleable[slot] = float(value)

    def _at(self, name: str, index: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)[index]

    def sample(self, batch_size: int) -> Batch:
        if self.num_sampleable == 0:
            raise RuntimeError("replay holds no complete n-step transition yet")
        return self.transitions(self.sample_slots(batch_size))

    def sample_slots(self, batch_size: int) -> torch.Tensor:
        """Uniform over the sampleable slots (slots_for), from this replay's generator."""
        return self.slots_for(torch.rand(batch_size, device=self.device, generator=self.generator))


@dataclass
class SequenceBatch(Batch):
    future_states: torch.Tensor  # (B, K, stack, H, W) uint8: s_{t+1} .. s_{t+K}
    future_actions: torch.Tensor  # (B, K) int64: a_t .. a_{t+K-1}
    future_mask: torch.Tensor  # (B, K) float32: 1 while s_{t+k} continues the trajectory of s_t
    weights: torch.Tensor  # (B,) importance weights 1/sqrt(P), divided by the batch's largest
    probabilities: torch.Tensor  # (B,) sampling probabilities


class PrioritizedFrameReplay(FrameReplay):
    """FrameReplay with proportional prioritized sampling and K-step future sequences (BBF, SPR).

    P(i) = p_i / sum_j p_j over sampleable slots; BBF stores p = sqrt(loss + 1e-10), which is
    alpha = 0.5 on the loss, and weighs the loss by P^-0.5 (beta = 0.5) divided by the batch's
    largest weight. New slots get the largest priority ever set. Priorities live on the device
    next to the frames, and the running maximum is a device scalar: adding and sampling never
    synchronize with the host. Sampling inverts the cumulative sum of all slots' priorities (one
    scan and a binary search per draw, fixed shapes: capturable in a CUDA graph), O(capacity) per
    batch instead of a sum tree's O(B log capacity); on 200k slots that is well under a
    millisecond on a GPU and a few on a CPU, against a BBF update of milliseconds / seconds.
    """

    def __init__(self, capacity: int, n_step: int, gamma: float, future_steps: int = 5, **kwargs):
        super().__init__(capacity, n_step, gamma, **kwargs)
        if future_steps > n_step:
            # sampleable slots guarantee n_step written successors; futures must not reach further
            raise ValueError(f"future_steps {future_steps} must be <= n_step {n_step}")
        self.future_steps = future_steps
        self.priorities = torch.zeros(capacity, dtype=torch.float32, device=self.device)
        self.max_priority = torch.ones((), dtype=torch.float32, device=self.device)

    def add(self, frame, action: int, reward: float, terminal: bool, truncated: bool):
        slot = self.head
        super().add(frame, action, reward, terminal, truncated)
        self.priorities[slot] = self.max_priority

    def update_priorities(self, slots: torch.Tensor, priorities: torch.Tensor) -> None:
        priorities = priorities.detach().float()
        self.priorities[slots] = priorities
        torch.maximum(self.max_priority, priorities.max(), out=self.max_priority)

    def sample(
        self, batch_size: int, n_step: int | None = None, gamma: float | torch.Tensor | None = None
    ) -> SequenceBatch:
        if self.num_sampleable == 0:
            raise RuntimeError("replay holds no complete n-step transition yet")
        weights = self.priorities * self.sampleable
        # Inverse CDF of the priorities (float64: exact enough over 10^5 slots), not torch.multinomial,
        # which synchronizes with the host and so cannot be captured in a CUDA graph.
        cdf = torch.cumsum(weights, 0, dtype=torch.float64)
        targets = torch.rand(batch_size, dtype=torch.float64, device=self.device, generator=self.generator) * cdf[-1]
        slots = torch.searchsorted(cdf, targets, right=True).clamp_(max=self.capacity - 1)
        probabilities = weights[slots] / weights.sum()
        importance = 1.0 / torch.sqrt(probabilities + 1e-10)
        base = self.transitions(slots, n_step, gamma)
        steps = torch.arange(self.future_steps, device=self.device)
        window = (slots[:, None] + steps[None, :]) % self.capacity  # t .. t+K-1
        terminals = self.terminals[window]
        # s_{t+k} belongs to the trajectory while none of the steps t .. t+k-1 ended it
        future_mask = torch.cumprod(1 - terminals, 1)
        future_slots = (window + 1) % self.capacity
        future_states = self.states_at(future_slots.reshape(-1)).reshape(batch_size, self.future_steps, self.stack,
                                                                         *self.frames.shape[1:])  # fmt: skip
        return SequenceBatch(
            **vars(base),
            future_states=future_states,
            future_actions=self.actions[window],
            future_mask=future_mask,
            weights=importance / importance.max(),
            probabilities=probabilities,
        )

    def state_dict(self) -> dict:
        return super().state_dict() | {
            "priorities": self.priorities[: self.size].cpu(),
            "max_priority": self.max_priority.cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.priorities[: state["size"]].copy_(state["priorities"])
        self.max_priority.copy_(state["max_priority"])


class StackedFrameReplays(TransitionReader):
    """The replays of N runs of one process (rlplastic.batched) in stacked device tensors, for a
    batched update that samples all runs at once.

        replays = StackedFrameReplays(4, 100_000, 10, 0.99, device="cuda", generators=[g1, g2, g3, g4])
        replays[i].add(...)                          # run i's FrameReplay: views of its slice
        batch = replays.sample(32)                   # (4, 32, ...) tensors, run i's batch at [i]

    Each run's FrameReplay adds, checkpoints and samples alone as before. sample() draws each run's
    slots from that run's own generator, as its FrameReplay.sample draws them (the same numbers),
    then reads all runs' transitions with one set of index operations and gathers (a few dozen
    kernels for any N, against about 20 per run when each run samples its own)."""

    def __init__(
        self,
        runs: int,
        capacity: int,
        n_step: int,
        gamma: float,
        frame_shape: tuple[int, int] = (84, 84),
        stack: int = 4,
        device: torch.device | str = "cpu",
        generators: list[torch.Generator | None] | None = None,
    ):
        generators = generators if generators is not None else [None] * runs
        if len(generators) != runs:
            raise ValueError(f"StackedFrameReplays: {len(generators)} generators for {runs} runs")
        self.device = torch.device(device)
        self.storage = FrameReplay.allocate(capacity, frame_shape, self.device, runs=(runs,))
        self.replays = [
            FrameReplay(capacity, n_step, gamma, frame_shape, stack, self.device, generator,
                        storage={name: tensor[i] for name, tensor in self.storage.items()})
            for i, generator in enumerate(generators)
        ]  # fmt: skip
        self.capacity, self.n_step, self.gamma, self.stack = capacity, n_step, gamma, stack
        self.discount_powers = self.replays[0].discount_powers
        self.sampleable = self.storage["sampleable"]
        self._runs = torch.arange(runs, device=self.device)

    def __len__(self) -> int:
        return len(self.replays)

    def __getitem__(self, i: int) -> FrameReplay:
        return self.replays[i]

    def _at(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """index (N, ...) of slots -> run i's tensor at index[i], for every run in one gather."""
        runs = self._runs.view(-1, *[1] * (index.dim() - 1))
        return self.storage[name][runs, index]

    def sample(self, batch_size: int) -> Batch:
        """Every run's batch, stacked (N, B, ...); run i's is what replays[i].sample gives."""
        if any(replay.num_sampleable == 0 for replay in self.replays):
            raise RuntimeError("a run's replay holds no complete n-step transition yet")
        # each run's uniform draw from its own generator (FrameReplay.sample_slots, all runs at once)
        draws = torch.stack([torch.rand(batch_size, device=self.device, generator=replay.generator)
                             for replay in self.replays])  # fmt: skip
        return self.transitions(self.slots_for(draws))
