"""The bit-flipping benchmark (Dohare et al. 2024): online regression on a slowly changing target.

Input: `bits` bits and a bias bit. The first `flipping` bits are fixed, except that one of them,
chosen at random, is inverted every `flip_every` steps; the other bits are drawn at random every
step. Target: a fixed random network of linear threshold units h_i = 1[w_i . x >= theta_i], with
w in {-1, +1}, theta_i = bits * beta - S_i (S_i: negative weights of unit i), and
y = w_out . h with w_out in {-1, +1}. The learner is a one-hidden-layer ReLU MLP trained online
(one sample per step) by SGD; its online squared error, and the state of its hidden layer, show
plasticity being lost, and continual backprop (switched on half-way) restoring it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rlplastic.diagnostics import dead_fraction, duplicate_fraction, effective_rank, weight_magnitude
from rlplastic.interventions import ContinualBackprop


@dataclass
class BitFlipConfig:
    bits: int = 20
    flipping: int = 15
    flip_every: int = 1_000  # Dohare et al. use 10,000; 1,000 shows the effect on a CPU in a minute
    target_units: int = 100
    beta: float = 0.7
    hidden: int = 100
    lr: float = 0.01
    steps: int = 200_000
    cbp_rate: float = 1e-4
    cbp_decay: float = 0.99
    cbp_maturity: int = 100
    record_every: int = 5_000
    probe_size: int = 2_000
    seed: int = 0


class BitFlippingTask:
    def __init__(self, bits: int, flipping: int, flip_every: int, target_units: int, beta: float, seed: int):
        if not 0 < flipping <= bits:
            raise ValueError(f"flipping {flipping}: must lie in 1..bits ({bits})")
        self.bits, self.flipping, self.flip_every = bits, flipping, flip_every
        self.generator = torch.Generator().manual_seed(seed)
        signs = lambda *shape: torch.randint(0, 2, shape, generator=self.generator).float() * 2 - 1  # noqa: E731
        self.weights = signs(target_units, bits + 1)  # the last column multiplies the bias bit
        self.thresholds = bits * beta - (self.weights < 0).sum(1).float()
        self.output_weights = signs(target_units)
        self.flipping_bits = torch.randint(0, 2, (flipping,), generator=self.generator).float()

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """(N, bits + 1) inputs -> (N,) targets."""
        return ((x @ self.weights.T) >= self.thresholds).float() @ self.output_weights

    def inputs(self, n: int) -> torch.Tensor:
        """n inputs under the current flipping bits: random free bits, bias bit 1."""
        free = torch.randint(0, 2, (n, self.bits - self.flipping), generator=self.generator).float()
        return torch.cat([self.flipping_bits.expand(n, -1), free, torch.ones(n, 1)], 1)

    def sample(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The example of online step `step` (a bit flips at every multiple of flip_every)."""
        if step % self.flip_every == 0:
            i = int(torch.randint(0, self.flipping, (1,), generator=self.generator))
            self.flipping_bits[i] = 1 - self.flipping_bits[i]
        x = self.inputs(1)
        return x, self.target(x)


def run_bitflip(
    config: BitFlipConfig, cbp_from: int | None = None, report: Callable[[dict], None] | None = None
) -> dict[str, list[float]]:
    """Train the learner online for config.steps; switch continual backprop on at step `cbp_from`.
    Every record_every steps: mean online squared error over the interval, and the hidden layer's
    effective rank, dead and duplicate fractions on a fixed probe of random inputs."""
    task = BitFlippingTask(
        config.bits, config.flipping, config.flip_every, config.target_units, config.beta, config.seed
    )
    torch.manual_seed(config.seed)
    learner = nn.Sequential(nn.Linear(config.bits + 1, config.hidden), nn.ReLU(), nn.Linear(config.hidden, 1))
    optimizer = torch.optim.SGD(learner.parameters(), lr=config.lr)
    probe_generator = torch.Generator().manual_seed(config.seed + 1)
    probe = torch.randint(0, 2, (config.probe_size, config.bits + 1), generator=probe_generator).float()
    probe[:, -1] = 1.0
    cbp = None
    history: dict[str, list[float]] = {
        k: [] for k in ("step", "error", "effective_rank", "dead", "duplicate", "weight_magnitude")
    }
    error_sum = torch.zeros(())
    for step in range(config.steps):
        if step == cbp_from:
            cbp = ContinualBackprop(
                learner, optimizer, config.cbp_rate, config.cbp_decay, config.cbp_maturity
            )  # fmt: skip
        x, y = task.sample(step)
        loss = (learner(x).squeeze(1) - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if cbp is not None:
            cbp.step()
        error_sum += loss.detach()
        if (step + 1) % config.record_every == 0:
            with torch.no_grad():
                h = torch.relu(learner[0](probe))
            row = {
                "step": step + 1,
                "error": error_sum.item() / config.record_every,
                "effective_rank": effective_rank(h).item(),
                "dead": dead_fraction(h).item(),
                "duplicate": duplicate_fraction(h).item(),
                "weight_magnitude": weight_magnitude(learner).item(),
            }
            for key, value in row.items():
                history[key].append(value)
            error_sum.zero_()
            if report is not None:
                report(row)
    if cbp is not None:
        cbp.remove()
    return history
