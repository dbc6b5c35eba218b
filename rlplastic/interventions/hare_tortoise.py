from __future__ import annotations

import torch
from torch import nn

from rlplastic.interventions.base import Every, Intervention, clear_optimizer_state


class HareTortoise(Intervention):
    """Hare & Tortoise (Lee et al. 2024, "Slow and Steady Wins the Race").

    Every step the tortoise follows the hare by an exponential moving average of parameters and
    floating-point buffers, tortoise <- momentum * tortoise + (1 - momentum) * hare. Every
    `reset_every` steps the hare is reset to a copy of the tortoise. Predictions use the tortoise;
    the hare is the network the optimizer trains.

    In RL the tortoise is the momentum target (momentum 0.995 = tau 0.005) and the paper resets
    every 4,000 gradient steps; in the supervised setting momentum 0.999 and a reset every 10
    epochs. The paper keeps the optimizer state across resets, hence reset_optimizer=False by
    default. With reset_every=0 this is a plain EMA target.

    Integer and boolean buffers are counters of the hare's own steps (BatchNorm's batch count, a
    lifecycle layer's clock and which of its units are alive): the tortoise copies them every step,
    and a reset leaves the hare's. Copied back, they would rewind the hare's clock to the moment of
    the tortoise's last copy (before that step's tick, for the lifecycle layers stepped after the
    EMA), apart from the host's mirror of it that decides deaths and revivals.

        ht = HareTortoise(hare=q, tortoise=q_target, momentum=0.995, reset_every=4000)
        ...; optimizer.step(); ht.step()
    """

    state_keys = ("due", "resets")

    def __init__(
        self,
        hare: nn.Module,
        tortoise: nn.Module,
        momentum: float = 0.995,
        reset_every: int = 4_000,
        optimizer: torch.optim.Optimizer | None = None,
        reset_optimizer: bool = False,
        average: bool = True,
    ):
        """average=False: the caller keeps the tortoise's EMA itself (BBF's target update, part of
        the agent); this only resets the hare to it."""
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum {momentum}: must lie in [0, 1)")
        if hare is tortoise:
            raise ValueError("hare and tortoise must be two networks (the tortoise is a separate EMA copy)")
        self.hare, self.tortoise, self.momentum = hare, tortoise, momentum
        self.optimizer, self.reset_optimizer, self.average = optimizer, reset_optimizer, average
        self.due = Every(reset_every)
        self.hare_params = list(hare.parameters())
        self.tortoise_params = list(tortoise.parameters())
        pairs = list(zip(hare.buffers(), tortoise.buffers(), strict=True))
        self.float_buffers = [(h, t) for h, t in pairs if h.is_floating_point()]
        self.other_buffers = [(h, t) for h, t in pairs if not h.is_floating_point()]
        self.resets = 0

    def metrics(self) -> dict[str, float]:
        return {"resets": self.resets}

    @torch.no_grad()
    def device_step(self) -> None:
        """tortoise <- momentum * tortoise + (1 - momentum) * hare (graph-capturable)."""
        if not self.average:
            return
        # One fused kernel per dtype/device group for all parameters: cheap enough to run every step.
        torch._foreach_lerp_(self.tortoise_params, self.hare_params, 1.0 - self.momentum)
        if self.float_buffers:
            tortoise_buffers, hare_buffers = zip(*[(t, h) for h, t in self.float_buffers], strict=True)
            torch._foreach_lerp_(list(tortoise_buffers), list(hare_buffers), 1.0 - self.momentum)
        if self.other_buffers:  # counters (BatchNorm's batch count, lifecycle clocks): copied, not averaged
            hare_counters, tortoise_counters = zip(*self.other_buffers, strict=True)
            torch._foreach_copy_(list(tortoise_counters), list(hare_counters))

    def host_step(self) -> None:
        if self.due():
            self.reset_hare()

    @torch.no_grad()
    def reset_hare(self) -> None:
        """hare <- tortoise (parameters and floating-point buffers), copied in place so the optimizer
        keeps its references; the hare keeps its own counters (see the class docstring)."""
        torch._foreach_copy_(self.hare_params, self.tortoise_params)
        for hare_buffer, tortoise_buffer in self.float_buffers:
            hare_buffer.copy_(tortoise_buffer)
        if self.reset_optimizer:
            clear_optimizer_state(self.optimizer, self.hare_params)
        self.resets += 1
