from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rlplastic.interventions.base import hidden_layers

REVIVALS = ("memory", "he", "xavier")


class _Lifecycle:
    """Neuron lifecycles (Yang 2025), per output unit of a Linear or Conv2d layer.

    Each unit lives for a random lifespan in [lifespan[0], lifespan[1]] training steps, then dies
    (lysis): its weights and bias are saved to memory and it is masked out (no output, no
    gradient) for a recovery time drawn from `recovery`. At revival its weights come back from
    memory (or a fresh He / Xavier draw, the ablations) and its output is scaled up over `warmup`
    steps: 1/k, 2/k, ..., 1. Output = (W * d) x + b * d with d = active * scaler.

    One lifecycle step (Algorithm 1) runs at every forward call in training mode, in the order
    (A) warm-up ramp of units with scaler < 1; (B) life -= active, recovery -= inactive;
    (C) lyse active units with life <= 0: save memory, active = 0, recovery = their recovery time,
    scaler = 1; (D) revive inactive units with recovery <= 0: restore, active = 1, life = their
    lifespan, scaler = 1/k. Evaluation-mode forwards apply the mask and scaler without changing them.

    Each unit draws its own lifespan and recovery time once; "life = L_max" and
    "recovery = R_max" in Algorithm 1 are read as these per-unit values. warmup <= 1 turns the
    warm-up off. bind_optimizer(opt) makes revival zero the optimizer's moments of revived units.
    All updates are masked tensor ops: no host sync in the training loop.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None

    def _init_lifecycle(self, lifespan: tuple[int, int], recovery: tuple[int, int], warmup: int, revival: str) -> None:
        for name, (lo, hi) in (("lifespan", lifespan), ("recovery", recovery)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} ({lo}, {hi}): need 1 <= low <= high")
        if revival not in REVIVALS:
            raise ValueError(f"revival {revival!r}: allowed {', '.join(REVIVALS)}")
        if warmup < 0:
            raise ValueError(f"warmup {warmup}: must be >= 0")
        units = self.weight.shape[0]
        device = self.weight.device
        self.warmup, self.revival = max(int(warmup), 1), revival
        self._optimizer_ref = None
        draw = lambda lo, hi: torch.randint(lo, hi + 1, (units,), device=device)  # noqa: E731
        self.register_buffer("active", torch.ones(units, dtype=torch.bool, device=device))
        self.register_buffer("scaler", torch.ones(units, device=device))
        self.register_buffer("lifespan", draw(*lifespan))
        self.register_buffer("recovery_time", draw(*recovery))
        self.register_buffer("life", self.lifespan.clone())
        self.register_buffer("recovery", torch.zeros(units, dtype=torch.long, device=device))
        self.register_buffer("memory_weight", self.weight.detach().clone())
        bias = self.bias.detach().clone() if self.bias is not None else torch.zeros(units, device=device)
        self.register_buffer("memory_bias", bias)

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer_ref = weakref.ref(optimizer)  # a weakref: deep copies of the layer stay light

    def extra_repr(self) -> str:
        return super().extra_repr() + f", warmup={self.warmup}, revival={self.revival}"

    def gate(self) -> torch.Tensor:
        """d = active * scaler, one factor per unit."""
        return self.active.to(self.scaler.dtype) * self.scaler

    @torch.no_grad()
    def lifecycle_step(self) -> None:
        # (A) warm-up ramp
        ramp = self.scaler < 1
        self.scaler.copy_(torch.where(ramp, (self.scaler + 1.0 / self.warmup).clamp(max=1.0), self.scaler))
        # (B) counters
        self.life.sub_(self.active.long())
        self.recovery.sub_((~self.active).long())
        # (C) lysis
        lyse = self.active & (self.life <= 0)
        rows = lyse.view(-1, *[1] * (self.weight.dim() - 1))
        self.memory_weight.copy_(torch.where(rows, self.weight, self.memory_weight))
        if self.bias is not None:
            self.memory_bias.copy_(torch.where(lyse, self.bias, self.memory_bias))
        self.active.logical_and_(~lyse)
        self.recovery.copy_(torch.where(lyse, self.recovery_time, self.recovery))
        self.scaler.masked_fill_(lyse, 1.0)
        # (D) revival
        revive = ~self.active & (self.recovery <= 0)
        rows = revive.view(-1, *[1] * (self.weight.dim() - 1))
        if self.revival == "memory":
            new_weight, new_bias = self.memory_weight, self.memory_bias
        else:
            new_weight = torch.empty_like(self.weight)
            if self.revival == "he":
                nn.init.kaiming_uniform_(new_weight, nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(new_weight)
            new_bias = torch.zeros_like(self.memory_bias)
        self.weight.copy_(torch.where(rows, new_weight, self.weight))
        if self.bias is not None:
            self.bias.copy_(torch.where(revive, new_bias, self.bias))
        self.active.logical_or_(revive)
        self.life.copy_(torch.where(revive, self.lifespan, self.life))
        self.scaler.masked_fill_(revive, 1.0 / self.warmup)
        self._zero_optimizer_rows(revive)

    def _zero_optimizer_rows(self, units: torch.Tensor) -> None:
        optimizer = self._optimizer_ref() if self._optimizer_ref is not None else None
        if optimizer is None:
            return
        for param in (self.weight, self.bias):
            if param is None or param not in optimizer.state:
                continue
            rows = units.view(-1, *[1] * (param.dim() - 1))
            for value in optimizer.state[param].values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value.masked_fill_(rows, 0.0)


class LifecycleLinear(_Lifecycle, nn.Linear):
    """nn.Linear with neuron lifecycles; see _Lifecycle for the rule."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        lifespan: tuple[int, int] = (1_000, 5_000),
        recovery: tuple[int, int] = (100, 500),
        warmup: int = 10,
        revival: str = "memory",
        device=None,
        dtype=None,
    ):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_lifecycle(lifespan, recovery, warmup, revival)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.lifecycle_step()
        d = self.gate()
        return F.linear(x, self.weight * d[:, None], None if self.bias is None else self.bias * d)


class LifecycleConv2d(_Lifecycle, nn.Conv2d):
    """nn.Conv2d with lifecycles per output channel; see _Lifecycle for the rule."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        lifespan: tuple[int, int] = (1_000, 5_000),
        recovery: tuple[int, int] = (100, 500),
        warmup: int = 10,
        revival: str = "memory",
        device=None,
        dtype=None,
    ):
        nn.Conv2d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )  # fmt: skip
        self._init_lifecycle(lifespan, recovery, warmup, revival)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.lifecycle_step()
        d = self.gate()
        return self._conv_forward(x, self.weight * d[:, None, None, None], None if self.bias is None else self.bias * d)


@torch.no_grad()
def swap_in_lifecycle(model: nn.Module, names: Sequence[str] | None = None, **lifecycle_kwargs) -> list[_Lifecycle]:
    """Replace the named nn.Linear / nn.Conv2d submodules of `model` by lifecycle versions that keep
    their weights. names=None takes every hidden layer (never an output layer). Build the optimizer
    after the swap: the new layers own new Parameter objects."""
    if names is None:
        by_module = {module: name for name, module in model.named_modules()}
        names = [by_module[layer] for layer, _ in hidden_layers(model)]
    swapped = []
    for name in names:
        old = model.get_submodule(name)
        if isinstance(old, nn.Linear):
            new = LifecycleLinear(old.in_features, old.out_features, old.bias is not None, **lifecycle_kwargs)
        elif isinstance(old, nn.Conv2d):
            new = LifecycleConv2d(
                old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                old.groups, old.bias is not None, old.padding_mode, **lifecycle_kwargs,
            )  # fmt: skip
        else:
            raise ValueError(f"{name!r} is a {type(old).__name__}; lifecycles apply to nn.Linear and nn.Conv2d")
        new = new.to(device=old.weight.device, dtype=old.weight.dtype)
        new.weight.copy_(old.weight)
        new.memory_weight.copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
            new.memory_bias.copy_(old.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        swapped.append(new)
    return swapped
