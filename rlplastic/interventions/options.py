"""The interventions of an agent run as one set of options: one dataclass (flat flags on the
command line when nested in an agent's Args), one validation, one builder.

    @dataclass
    class Args:
        interventions: Annotated[InterventionOptions, tyro.conf.arg(name="")] = field(...)

    problems += args.interventions.problems("drq", supported=ALL_METHODS)
    swap_in_chosen_lifecycle(args.interventions, q_network, optimizer)   # before the target copy
    interventions = build_interventions(args.interventions, q_network, target, optimizer, sample_states,
                                        init_fn=xavier_uniform_zero_bias, head=("head", "advantage", "value"))

Every interval counts gradient (optimizer) steps. Resets act on a schedule (--reset); methods that
act at every step and are not resets are chosen with --continual.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from rlplastic.init import torch_default_init
from rlplastic.interventions.base import InitFn, Intervention, Interventions
from rlplastic.interventions.continual_backprop import ContinualBackprop
from rlplastic.interventions.gradient_noise import GradientNoise
from rlplastic.interventions.hare_tortoise import HareTortoise
from rlplastic.interventions.lifecycle import _Lifecycle, lifecycle_metrics, swap_in_lifecycle, tick_lifecycles
from rlplastic.interventions.redo import ReDo
from rlplastic.interventions.shrink_perturb import HeadReset, ShrinkPerturb

ResetMethod = Literal["hare-tortoise", "head", "shrink-perturb", "redo"]
ContinualMethod = Literal["cbp", "noise", "lifecycle"]
ALL_METHODS = frozenset({"hare-tortoise", "head", "shrink-perturb", "redo", "cbp", "noise", "lifecycle"})

# Gradient steps between applications when neither the method's own flag nor --reset-every is
# given: Hare & Tortoise's RL setting (Lee et al. 2024, Table 1), head resets as Nikishin et al.
# 2022 and Lee et al. use them at replay ratio 1 to 2, ReDo's period (Sokar et al. 2023).
DEFAULT_EVERY = {"hare-tortoise": 4_000, "head": 20_000, "shrink-perturb": 20_000, "redo": 1_000}
OWN_INTERVAL = {"hare-tortoise": "ht_every", "head": "head_every", "shrink-perturb": "sp_every", "redo": "redo_every"}

# Methods that each decide which units to replace: two of them on the same units contradict each other.
UNIT_METHODS = ("redo", "cbp", "lifecycle")


@dataclass
class InterventionOptions:
    """Plasticity interventions (rlplastic.interventions), stepped after every optimizer step."""

    reset: tuple[ResetMethod, ...] = ()
    """scheduled resets, combinable: hare-tortoise (hare <- tortoise, needs --ema), head (re-init the
    network's head), shrink-perturb (Ash & Adams), redo (recycle dormant units, Sokar et al.)"""
    continual: tuple[ContinualMethod, ...] = ()
    """methods that act at every gradient step, combinable: cbp (continual backprop), noise (noisy SGD),
    lifecycle (lifecycle layers, Yang 2025)"""
    ema: float = 0.0
    """momentum of the EMA target network, Hare & Tortoise's tortoise (0.995 = tau 0.005); 0 = none"""
    reset_every: int | None = None
    """gradient steps between resets, for every chosen reset without its own interval flag
    (defaults: hare-tortoise 4,000, head 20,000, shrink-perturb 20,000, redo 1,000)"""
    ht_every: int | None = None
    """Hare & Tortoise: gradient steps between hare <- tortoise copies (default --reset-every or 4,000)"""
    head_every: int | None = None
    """head reset: gradient steps between re-inits of the head (default --reset-every or 20,000)"""
    sp_every: int | None = None
    """Shrink & Perturb: gradient steps between applications (default --reset-every or 20,000)"""
    sp_shrink: float = 0.4
    """Shrink & Perturb: factor on the current parameters (Ash & Adams: 0.4)"""
    sp_perturb: float = 0.1
    """Shrink & Perturb: factor on a fresh init (Ash & Adams: 0.1)"""
    redo_every: int | None = None
    """ReDo: gradient steps between recycling passes (default --reset-every or 1,000)"""
    redo_tau: float = 0.1
    """ReDo: a unit is dormant when its normalized score is <= tau"""
    redo_batch: int = 256
    """ReDo: states from replay used to score units"""
    cbp_rate: float = 1e-4
    """continual backprop: fraction of mature units replaced per step"""
    cbp_decay: float = 0.99
    """continual backprop: decay of the utility averages"""
    cbp_maturity: int = 100
    """continual backprop: steps before a unit may be replaced"""
    noise_sigma: float = 0.01
    """noisy SGD (Joudaki et al.): sigma_0 of the isotropic gradient noise N(0, sigma_t^2 ||g||^2 I)"""
    noise_decay: float = 0.999
    """noisy SGD: per-step decay lambda of sigma_t = sigma_0 * lambda^t"""
    lifecycle_lifespan: tuple[int, int] = (1_000, 5_000)
    """lifecycle: range of each unit's lifespan in gradient steps"""
    lifecycle_recovery: tuple[int, int] = (100, 500)
    """lifecycle: range of each unit's recovery time in gradient steps"""
    lifecycle_warmup: int = 10
    """lifecycle: steps over which a revived unit's output ramps up (0 = no warm-up)"""
    lifecycle_revival: Literal["memory", "he", "xavier"] = "memory"
    """lifecycle: revive from saved weights, or by a fresh He / Xavier init (ablations)"""

    @property
    def chosen(self) -> list[str]:
        return [*self.reset, *self.continual]

    def every(self, method: str) -> int:
        """Gradient steps between applications of a scheduled reset."""
        return getattr(self, OWN_INTERVAL[method]) or self.reset_every or DEFAULT_EVERY[method]

    def problems(self, agent: str, supported: Collection[str] = ALL_METHODS, needs_ema: bool = False) -> list[str]:
        """Every problem with these options for `agent`, each naming the value and what is allowed."""
        problems = []
        for flag, values in (("--reset", self.reset), ("--continual", self.continual)):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                problems.append(f"{flag} {' '.join(values)}: {', '.join(repeated)} given twice")
        unsupported = [m for m in self.chosen if m not in supported]
        if unsupported:
            allowed = ", ".join(sorted(supported))
            problems.append(f"{agent} does not support {', '.join(unsupported)}; it supports {allowed}")
        if "hare-tortoise" in self.reset and self.ema <= 0:
            problems.append("--reset hare-tortoise needs --ema > 0 (e.g. 0.995): the tortoise is the EMA target")
        if needs_ema and self.ema <= 0:
            problems.append(f"--ema {self.ema}: {agent} needs an EMA target, momentum in (0, 1) (e.g. 0.995)")
        if not 0.0 <= self.ema < 1.0:
            problems.append(f"--ema {self.ema}: must lie in [0, 1) (0 = no EMA target)")
        unit_methods = [m for m in UNIT_METHODS if m in self.chosen]
        if len(unit_methods) > 1:
            problems.append(f"{' and '.join(unit_methods)} both replace units: choose one")
        for name in ("reset_every", *OWN_INTERVAL.values()):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"--{name.replace('_', '-')} {value}: must be a positive integer")
        if not (self.sp_shrink >= 0 and self.sp_perturb >= 0):
            problems.append(f"--sp-shrink {self.sp_shrink} / --sp-perturb {self.sp_perturb}: must be >= 0")
        if self.redo_tau < 0 or self.redo_batch <= 0:
            problems.append(f"--redo-tau {self.redo_tau} / --redo-batch {self.redo_batch}: need tau >= 0 and batch > 0")
        if not 0 <= self.cbp_rate <= 1 or not 0 <= self.cbp_decay < 1 or self.cbp_maturity < 0:
            problems.append(f"--cbp-rate {self.cbp_rate} / --cbp-decay {self.cbp_decay} / --cbp-maturity "
                            f"{self.cbp_maturity}: need rate in [0, 1], decay in [0, 1), maturity >= 0")  # fmt: skip
        if self.noise_sigma < 0 or not 0 < self.noise_decay <= 1:
            problems.append(
                f"--noise-sigma {self.noise_sigma} / --noise-decay {self.noise_decay}: need >= 0 and (0, 1]"
            )
        for name in ("lifecycle_lifespan", "lifecycle_recovery"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                problems.append(f"--{name.replace('_', '-')} {low} {high}: need 1 <= low <= high")
        if self.lifecycle_warmup < 0:
            problems.append(f"--lifecycle-warmup {self.lifecycle_warmup}: must be >= 0")
        return problems


def ema_target(network: nn.Module) -> nn.Module:
    """A frozen copy of `network`: the EMA target (the tortoise) that HareTortoise keeps."""
    target = copy.deepcopy(network)
    target.requires_grad_(False)
    return target


def swap_in_chosen_lifecycle(
    options: InterventionOptions, network: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """With --continual lifecycle, turn the network's hidden layers into lifecycle layers, the
    optimizer bound to them. Call it before copying the network into a target."""
    if "lifecycle" in options.continual:
        swap_in_lifecycle(
            network, optimizer=optimizer, lifespan=options.lifecycle_lifespan, recovery=options.lifecycle_recovery,
            warmup=options.lifecycle_warmup, revival=options.lifecycle_revival,
        )  # fmt: skip


class Lifecycle(Intervention):
    """The lifecycle layers' clock as an intervention: it takes the layers' ticks over from their
    optimizer hook (drive_externally), so device_step() is the per-step device work (warm-up ramp,
    counters), graph-capturable, and host_step() decides deaths and revivals on the host and applies
    them in place. metrics() reports the share of units resting. The layers tick in training mode
    only, as under their optimizer hook."""

    def __init__(self, network: nn.Module):
        self.network = network
        self.layers = [m for m in network.modules() if isinstance(m, _Lifecycle)]
        for layer in self.layers:
            layer.drive_externally()

    def device_step(self) -> None:
        tick_lifecycles([layer for layer in self.layers if layer.training])  # three fused kernels for all

    def host_step(self) -> None:
        for layer in self.layers:
            if layer.training:
                layer.lifecycle_host_tick()

    def metrics(self) -> dict[str, float]:
        return {key.split("/", 1)[1]: value for key, value in lifecycle_metrics(self.network).items()}


def build_interventions(
    options: InterventionOptions,
    online: nn.Module,
    target: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    sample_states: Callable[[int], torch.Tensor],
    init_fn: InitFn = torch_default_init,
    head: Sequence[str] = (),
    agent_keeps_ema: bool = False,
) -> Interventions:
    """The chosen interventions, stepped in this order after every optimizer step: the EMA target
    first (Hare & Tortoise's tortoise, which resets the hare only with --reset hare-tortoise), then
    head reset, Shrink & Perturb, ReDo, continual backprop, noisy SGD, lifecycle.

    `target` is the EMA target network (None without --ema); head resets and Shrink & Perturb act
    on the online network and the target alike, each with its own fresh draw (as BBF's resets do);
    unit recycling acts on the online network. `sample_states(n)` gives n states from replay (ReDo
    scores units on them); `init_fn` is the network's own initialization (by default each
    layer's reset_parameters); `head` names the submodules a head reset re-initializes.
    `agent_keeps_ema`: the agent updates `target` itself (BBF); Hare & Tortoise then only resets."""
    networks = [online] + ([target] if target is not None else [])
    items: list[Intervention] = []
    if target is not None and not (agent_keeps_ema and "hare-tortoise" not in options.reset):
        every = options.every("hare-tortoise") if "hare-tortoise" in options.reset else 0
        items.append(HareTortoise(online, target, momentum=options.ema, reset_every=every, average=not agent_keeps_ema))
    if "head" in options.reset:
        items.append(HeadReset(networks, list(head), options.every("head"), optimizer, init_fn))
    if "shrink-perturb" in options.reset:
        shrink = {"": (options.sp_shrink, options.sp_perturb)}
        items.append(ShrinkPerturb(networks, shrink, options.every("shrink-perturb"), optimizer, init_fn))
    if "redo" in options.reset:
        batch_fn = lambda: sample_states(options.redo_batch)  # noqa: E731
        items.append(ReDo(online, optimizer, batch_fn, options.redo_tau, options.every("redo"), init_fn=init_fn))
    if "cbp" in options.continual:
        items.append(ContinualBackprop(online, optimizer, options.cbp_rate, options.cbp_decay, options.cbp_maturity,
                                       init_fn=init_fn))  # fmt: skip
    if "noise" in options.continual:
        items.append(GradientNoise(optimizer, options.noise_sigma, options.noise_decay))
    if "lifecycle" in options.continual:
        items.append(Lifecycle(online))
    return Interventions(items)
