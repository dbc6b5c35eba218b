"""The cloning experiment of Joudaki et al. (section 2, Fig. 2.1; appendix B.1.2).

A small ReLU MLP (the base) is trained on a task; a wider copy is built whose every hidden unit is
`factor` exact clones of a base unit (incoming rows repeated, outgoing weights split between the
clones), so the two networks compute the same function and the clones the same activations. Both
then keep training on the task: the clone with plain SGD, noisy SGD or dropout. Theorem 2.1 says
SGD stays on the cloning manifold (clones remain identical: cloning R^2 = 1 and the clone's
features have no more rank than the base's); noise and dropout break the symmetry and leave it.

Cloning R^2 of a hidden layer (appendix B): 1 - sum (h_u - m_b(u))^2 / sum (h_u - mean h_u)^2 over
samples and units, m_b the mean of unit u's block of clones; measured on the forward activations
and on the backward errors (loss gradients at the pre-activations) of every hidden layer and
averaged, on a fixed batch, as the paper reports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rlplastic.cli import seed_problems
from rlplastic.diagnostics import effective_rank
from rlplastic.interventions import GradientNoise

VARIANTS = ("sgd", "noisy-sgd", "dropout")


@dataclass
class CloningConfig:
    hidden: int = 32
    """hidden units per layer of the base MLP (two hidden layers)"""
    factor: int = 4
    """clones per base unit: the clone has hidden * factor units per layer"""
    base_steps: int = 2_000
    """SGD steps training the base before it is cloned"""
    steps: int = 10_000
    """steps of training after cloning (base and clones alike)"""
    lr: float = 0.05
    """SGD learning rate, before and after cloning"""
    batch_size: int = 64
    sigma0: float = 0.01
    """noisy SGD: initial noise scale relative to the gradient norm (the paper's 0.01)"""
    decay: float = 0.999
    """noisy SGD: the noise scale's decay per step (the paper's 0.999)"""
    dropout: float = 0.1
    """dropout rate of the dropout variant's hidden layers"""
    measure_every: int = 100
    seed: int = 0
    variants: tuple[str, ...] = field(default=VARIANTS)


class MLP(nn.Module):
    def __init__(self, inputs: int, hidden: int, outputs: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(inputs, hidden), nn.Linear(hidden, hidden)])
        self.out = nn.Linear(hidden, outputs)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, keep: list | None = None) -> torch.Tensor:
        """keep: a list that receives each hidden layer's (pre-activation, activation)."""
        for layer in self.layers:
            z = layer(x)
            x = F.dropout(F.relu(z), self.dropout, self.training)
            if keep is not None:
                keep.append((z, x))
        return self.out(x)


@torch.no_grad()
def clone_mlp(base: MLP, factor: int, dropout: float = 0.0) -> MLP:
    """A wider MLP computing the same function: each hidden unit repeated `factor` times, weights
    out of a block divided by `factor` so the next layer receives the same sum."""
    first, second = base.layers
    wide = MLP(first.in_features, first.out_features * factor, base.out.out_features, dropout)
    wide.layers[0].weight.copy_(first.weight.repeat_interleave(factor, 0))
    wide.layers[0].bias.copy_(first.bias.repeat_interleave(factor))
    wide.layers[1].weight.copy_(second.weight.repeat_interleave(factor, 0).repeat_interleave(factor, 1) / factor)
    wide.layers[1].bias.copy_(second.bias.repeat_interleave(factor))
    wide.out.weight.copy_(base.out.weight.repeat_interleave(factor, 1) / factor)
    wide.out.bias.copy_(base.out.bias)
    return wide


def cloning_r2(h: torch.Tensor, factor: int) -> float:
    """1 - residual / total variance of (samples, units) h around its blocks' means."""
    blocks = h.reshape(h.shape[0], -1, factor)
    residual = (blocks - blocks.mean(2, keepdim=True)).pow(2).sum()
    total = (h - h.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    return float(1 - residual / total)


def measure(model: MLP, x: torch.Tensor, y: torch.Tensor, factor: int) -> dict[str, float]:
    """Loss, effective rank of the last hidden features and (for a clone) cloning R^2, on a fixed
    batch, in evaluation mode (no dropout)."""
    was_training = model.training
    model.eval()
    keep: list = []
    loss = F.cross_entropy(model(x, keep), y, reduction="sum")
    errors = torch.autograd.grad(loss, [z for z, _ in keep])
    model.train(was_training)
    row = {"loss": loss.item() / len(x), "effective_rank": effective_rank(keep[-1][1].detach()).item()}
    if factor > 1:
        scores = [cloning_r2(h.detach(), factor) for _, h in keep] + [cloning_r2(e, factor) for e in errors]
        row["cloning_r2"] = float(np.mean(scores))
    return row


def load_digits_tensors(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (real data, bundled), standardized, split 80 / 20."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def train(model: MLP, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int,
          batch_size: int, generator: torch.Generator, on_measure=None, every: int = 0) -> None:  # fmt: skip
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_measure is not None and every and step % every == 0:
            on_measure(step)


def run_cloning(config: CloningConfig, done: dict[str, list[dict]] | None = None,
                on_run: Callable[[dict], None] | None = None) -> dict:  # fmt: skip
    """Train the base, clone it, train base and clones on; histories of every variant.

    done: histories an interrupted invocation with the same config finished ({name: history}); they
    are kept, not trained again, and the others come out as they would have without the
    interruption (the base is trained again: it is what the clones are made of). on_run(result so
    far) after every run, so that a caller can save each as it finishes."""
    problems = [f"variant {v!r}: allowed {', '.join(VARIANTS)}" for v in config.variants if v not in VARIANTS]
    problems += [f"--config.factor {config.factor}: need >= 2 clones per unit"] if config.factor < 2 else []
    problems += [f"--config.hidden {config.hidden}: need >= 1 unit"] if config.hidden < 1 else []
    problems += seed_problems("--config.seed", config.seed)
    if problems:
        raise ValueError("; ".join(problems))
    torch.manual_seed(config.seed)
    x, y, _, _ = load_digits_tensors(config.seed)
    probe_x, probe_y = x[:512], y[:512]
    base = MLP(x.shape[1], config.hidden, 10)
    train(base, torch.optim.SGD(base.parameters(), lr=config.lr), x, y, config.base_steps, config.batch_size,
          torch.Generator().manual_seed(config.seed))  # fmt: skip
    histories: dict[str, list[dict]] = {}
    runs = [("base", base, 1, None)]
    for variant in config.variants:
        runs.append((variant, clone_mlp(base, config.factor, config.dropout if variant == "dropout" else 0.0),
                     config.factor, variant))  # fmt: skip
    start = measure(runs[1][1], probe_x, probe_y, config.factor) if len(runs) > 1 else None
    result = {"histories": histories, "clone_at_start": start, "base_params": sum(p.numel() for p in base.parameters())}
    for name, model, factor, variant in runs:
        if name == "base":
            model = MLP(x.shape[1], config.hidden, 10)  # draws from the global generator, done or not
            model.load_state_dict(base.state_dict())
        if done and name in done:
            histories[name] = done[name]
            continue
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
        if variant == "noisy-sgd":
            GradientNoise(optimizer, config.sigma0, config.decay, torch.Generator().manual_seed(config.seed + 1))
        history = [{"step": 0, **measure(model, probe_x, probe_y, factor)}]
        record = lambda step, model=model, factor=factor, history=history: history.append(  # noqa: E731
            {"step": step, **measure(model, probe_x, probe_y, factor)}
        )
        # the same batches for every run after cloning: only the learning rule differs
        train(model, optimizer, x, y, config.steps, config.batch_size, torch.Generator().manual_seed(config.seed + 2),
              record, config.measure_every)  # fmt: skip
        histories[name] = history
        if on_run is not None:
            on_run(result)
    return result
