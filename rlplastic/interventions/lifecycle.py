from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rlplastic.interventions.base import zero_optimizer_state
from rlplastic.introspection import hidden_layers

REVIVALS = ("memory", "he", "xavier")


class _Lifecycle:
    """Neuron lifecycles (Yang 2025), per output unit of a Linear or Conv2d layer.

    Each unit lives for a random lifespan in [lifespan[0], lifespan[1]] training steps, then dies
    (lysis): its weights and bias are saved to memory and it is masked out (no output, no
    gradient) for a recovery time drawn from `recovery`. At revival its weights come back from
    memory (or a fresh He / Xavier draw, the ablations) and its output is scaled up over `warmup`
    steps: 1/k, 2/k, ..., 1. Output = (W * d) x + b * d with d = active * scaler.

    One lifecycle step (Algorithm 1) runs once per training iteration, in the order
    (A) warm-up ramp of units with scaler < 1; (B) life -= active, recovery -= inactive;
    (C) lyse active units with life <= 0: save memory, active = 0, recovery = their recovery time,
    scaler = 1; (D) revive inactive units with recovery <= 0: restore, active = 1, life = their
    lifespan, scaler = 1/k. The clock is the optimizer: once bind_optimizer(opt) (or
    swap_in_lifecycle(model, optimizer=opt)) has run, a step-post-hook ticks every layer once per
    opt.step() in training mode, however many forwards the caller runs per update (an agent's
    acting, target and double-DQN forwards age nothing). An unbound layer falls back to ticking at
    every training-mode forward that builds a graph. Forwards apply the mask and scaler.

    The per-step device work of many layers runs as three fused (foreach) kernels in all
    (tick_lifecycles), whatever the number of layers, so it costs almost nothing inside a captured
    update.

    Each unit draws its own lifespan and recovery time once; "life = L_max" and
    "recovery = R_max" in Algorithm 1 are read as these per-unit values. warmup <= 1 turns the
    warm-up off. Revival also zeroes the bound optimizer's moments of the revived rows: Algorithm 1
    does not say so; it is our choice, so that a revived unit does not resume the stale momentum it
    had when it died.

    Followed by BatchNorm, a gate on the layer's own output would do nothing: BN would turn a lysed
    unit's zeros into its shift beta (the unit keeps outputting and training) and normalize the
    warm-up ramp away. gate_after(norm) moves the gate behind the norm (a forward hook on it), so a
    lysed unit outputs exactly 0 after normalization and activation and a reviving one ramps up
    there; swap_in_lifecycle does this by itself for the BatchNorm registered right after a layer.
    The counters are mirrored on the host, so deaths and revivals are decided without a device sync
    and only the affected rows are touched.
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
        self._clock_hook = None
        self._host = None
        self.gated_after = None  # the norm module whose output carries the gate, if any
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
        # What each counter loses per tick (life: 1 while active; recovery: 1 while resting), kept
        # beside `active` so the tick is one fused subtraction; derived, so not saved.
        self.register_buffer("life_step", self.active.long(), persistent=False)
        self.register_buffer("recovery_step", (~self.active).long(), persistent=False)

    def _derive_steps(self) -> None:
        self.life_step.copy_(self.active)
        self.recovery_step.copy_(~self.active)

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Tick this layer's clock once per optimizer.step() (in training mode), and zero the
        optimizer's moments of revived units. Binding again moves the clock to the new optimizer."""
        if hasattr(self._clock_hook, "remove"):
            self._clock_hook.remove()
        self._optimizer_ref = weakref.ref(optimizer)  # weakrefs: deep copies of the layer stay light
        layer = weakref.ref(self)

        def tick(*_) -> None:
            bound = layer()
            if bound is not None and bound.training:
                bound.lifecycle_step()

        self._clock_hook = optimizer.register_step_post_hook(tick)

    def gate_after(self, norm: nn.Module) -> None:
        """Apply this layer's gate to the output of `norm` (a per-unit norm such as BatchNorm that
        follows the layer) instead of to the layer's own output."""
        if self.gated_after is not None:
            raise ValueError("this lifecycle layer is already gated after a norm")
        norm.register_forward_hook(_GateAfterNorm(self))
        self.gated_after = type(norm).__name__

    def _gated(self, out: torch.Tensor, unit_dim: int) -> torch.Tensor:
        if self.gated_after is not None:
            return out  # the norm's hook applies the gate
        return out * _along(self.gate(), out, unit_dim)

    def _ticks_on_forward(self) -> bool:
        return self._clock_hook is None and self.training and torch.is_grad_enabled()

    def __deepcopy__(self, memo):
        # A copy (a target network, an EMA tortoise) is not bound to the optimizer: its clock does
        # not tick on the original's steps, and it gets no hook of its own.
        hook, self._clock_hook = self._clock_hook, None
        try:
            cls = type(self)
            copy_ = cls.__new__(cls)
            memo[id(self)] = copy_
            for key, value in self.__dict__.items():
                setattr(copy_, key, copy.deepcopy(value, memo))
        finally:
            self._clock_hook = hook
        copy_._clock_hook = "copied" if hook is not None else None  # a bound copy never ticks on forwards
        return copy_

    def extra_repr(self) -> str:
        return super().extra_repr() + f", warmup={self.warmup}, revival={self.revival}"

    def gate(self) -> torch.Tensor:
        """d = active * scaler, one factor per unit (one kernel: a float times a bool tensor)."""
        return self.scaler * self.active

    def refresh_counters(self) -> None:
        """Re-read the counters from the buffers; call after changing them by hand."""
        self._host = None
        self._derive_steps()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host = None
        self._derive_steps()

    def _host_counters(self) -> dict[str, np.ndarray]:
        # The lifecycle is a clock: which units die or revive never depends on data, so a host
        # copy of the counters decides it without waiting for the device (read once, then kept).
        if getattr(self, "_host", None) is None:
            names = ("active", "life", "recovery", "lifespan", "recovery_time")
            self._host = {name: getattr(self, name).cpu().numpy().copy() for name in names}
        return self._host

    @torch.no_grad()
    def lifecycle_step(self) -> None:
        """One tick of Algorithm 1: the device part, then the host's decisions."""
        self.lifecycle_device_tick()
        self.lifecycle_host_tick()

    def lifecycle_device_tick(self) -> None:
        """(A) the warm-up ramp and (B) the counters of this layer: tick_lifecycles([self])."""
        tick_lifecycles([self])

    @torch.no_grad()
    def lifecycle_host_tick(self) -> None:
        """(B) the host mirror of the counters, then (C) lysis and (D) revival of the units due:
        decided on the host, applied in place to the affected rows (outside any captured graph)."""
        host = self._host_counters()
        host["life"] -= host["active"]
        host["recovery"] -= ~host["active"]
        lyse = np.flatnonzero(host["active"] & (host["life"] <= 0))
        if len(lyse):
            host["active"][lyse] = False
            host["recovery"][lyse] = host["recovery_time"][lyse]
            self._lyse(torch.as_tensor(lyse, device=self.weight.device))
        revive = np.flatnonzero(~host["active"] & (host["recovery"] <= 0))
        if len(revive):
            host["active"][revive] = True
            host["life"][revive] = host["lifespan"][revive]
            self._revive(torch.as_tensor(revive, device=self.weight.device))

    def drive_externally(self) -> None:
        """Stop ticking on the optimizer's steps (and on forwards): the caller calls
        lifecycle_device_tick() and lifecycle_host_tick() once per training step instead, as
        rlplastic.interventions.Lifecycle does so that an agent can capture the device part."""
        if hasattr(self._clock_hook, "remove"):
            self._clock_hook.remove()
        self._clock_hook = "driven"

    def _lyse(self, units: torch.Tensor) -> None:
        self.memory_weight.index_copy_(0, units, self.weight.index_select(0, units))
        if self.bias is not None:
            self.memory_bias.index_copy_(0, units, self.bias.index_select(0, units))
        self.active.index_fill_(0, units, False)
        self.recovery.index_copy_(0, units, self.recovery_time.index_select(0, units))
        self.scaler.index_fill_(0, units, 1.0)
        self._derive_steps()

    def _revive(self, units: torch.Tensor) -> None:
        if self.revival == "memory":
            self.weight.index_copy_(0, units, self.memory_weight.index_select(0, units))
            if self.bias is not None:
                self.bias.index_copy_(0, units, self.memory_bias.index_select(0, units))
        else:
            fresh = torch.empty_like(self.weight)
            if self.revival == "he":
                nn.init.kaiming_uniform_(fresh, nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(fresh)
            self.weight.index_copy_(0, units, fresh.index_select(0, units))
            if self.bias is not None:
                self.bias.index_fill_(0, units, 0.0)
        self.active.index_fill_(0, units, True)
        self.life.index_copy_(0, units, self.lifespan.index_select(0, units))
        self.scaler.index_fill_(0, units, 1.0 / self.warmup)
        self._derive_steps()
        optimizer = self._optimizer_ref() if self._optimizer_ref is not None else None
        for param in (self.weight, self.bias):
            if param is not None:
                zero_optimizer_state(optimizer, param, units, 0)


@torch.no_grad()
def tick_lifecycles(layers: Sequence[_Lifecycle]) -> None:
    """(A) the warm-up ramp and (B) the counters of every layer in `layers`, on the device: three
    fused (foreach) kernels for all of them, no host sync, graph-capturable (once each layer's host
    mirror exists; it is read here the first time, before the counters move).

    (A) scaler <- min(scaler + 1/warmup, 1): a unit at 1 (every active unit past its warm-up, every
    resting one) stays at 1. (B) life -= active, recovery -= not active."""
    if not layers:
        return
    for layer in layers:
        layer._host_counters()
    counters = [layer.life for layer in layers] + [layer.recovery for layer in layers]
    torch._foreach_sub_(counters, [layer.life_step for layer in layers] + [layer.recovery_step for layer in layers])
    scalers = [layer.scaler for layer in layers]
    torch._foreach_add_(scalers, [1.0 / layer.warmup for layer in layers])
    torch._foreach_clamp_max_(scalers, 1.0)


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
        if self._ticks_on_forward():
            self.lifecycle_step()
        # (W * d) x + b * d = d * (W x + b): gating the output costs O(batch * units), not O(weights),
        # and still gives dead units no gradient.
        return self._gated(F.linear(x, self.weight, self.bias), -1)


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
        if self._ticks_on_forward():
            self.lifecycle_step()
        return self._gated(self._conv_forward(x, self.weight, self.bias), 1)


class _GateAfterNorm:
    """Forward hook of the norm after a lifecycle layer: multiplies the norm's output by the layer's
    gate. An object rather than a closure so that deep copies of the model (targets, EMA copies)
    gate by their own copy of the layer."""

    def __init__(self, layer: _Lifecycle):
        self.layer = layer

    def __call__(self, _norm: nn.Module, _inputs, out: torch.Tensor) -> torch.Tensor:
        return out * _along(self.layer.gate(), out, 1)  # BatchNorm: units on dim 1


def _along(gate: torch.Tensor, out: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """The per-unit gate shaped to broadcast over `out`, whose units lie on `unit_dim`."""
    shape = [1] * out.dim()
    shape[unit_dim] = -1
    return gate.view(shape)


def _norm_after(model: nn.Module, name: str) -> str | None:
    """The name of the BatchNorm registered right after `name` in its parent (Sequential order, or a
    block's attribute order such as conv1, bn1), if it normalizes this layer's units."""
    parent_name, _, child = name.rpartition(".")
    siblings = list(model.get_submodule(parent_name).named_children())
    position = [key for key, _ in siblings].index(child)
    if position + 1 == len(siblings):
        return None
    key, module = siblings[position + 1]
    units = model.get_submodule(name).weight.shape[0]
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.num_features == units:
        return f"{parent_name}.{key}" if parent_name else key
    return None


@torch.no_grad()
def swap_in_lifecycle(
    model: nn.Module,
    names: Sequence[str] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    norms: dict[str, str] | None = None,
    **lifecycle_kwargs,
) -> list[_Lifecycle]:
    """Replace the named nn.Linear / nn.Conv2d submodules of `model` by lifecycle versions that keep
    their weights. names=None takes every hidden layer (never an output layer).

    A layer followed by BatchNorm is gated after it (see _Lifecycle): `norms` maps layer names to
    the name of their norm; None finds them (the BatchNorm registered right after a layer in its
    parent, with as many features as the layer has units); {} gates every layer on its own output.

    With `optimizer` (already built on the model), the optimizer is handed the new layers'
    parameters in place of the old ones (state carried over) and bound: the clock then ticks once
    per optimizer.step() with no further call. Without it, build the optimizer after the swap and
    call bind_optimizer on each layer returned."""
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
        norm = _norm_after(model, name) if norms is None else norms.get(name)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        if norm is not None:
            new.gate_after(model.get_submodule(norm))
        if optimizer is not None:
            _replace_parameters(optimizer, {old.weight: new.weight, old.bias: new.bias} if old.bias is not None
                                else {old.weight: new.weight})  # fmt: skip
            new.bind_optimizer(optimizer)
        swapped.append(new)
    return swapped


def _replace_parameters(optimizer: torch.optim.Optimizer, mapping: dict[torch.Tensor, torch.Tensor]) -> None:
    """Point the optimizer at new Parameter objects, moving any state it holds for the old ones."""
    for group in optimizer.param_groups:
        group["params"] = [mapping.get(p, p) for p in group["params"]]
    for old, new in mapping.items():
        if old in optimizer.state:
            optimizer.state[new] = optimizer.state.pop(old)


def lifecycle_metrics(model: nn.Module) -> dict[str, float]:
    """lifecycle/dead: the share of the model's lifecycle units resting now, read from the layers'
    host mirrors of their counters (no device sync); empty for a model without lifecycle layers."""
    layers = [m for m in model.modules() if isinstance(m, _Lifecycle)]
    if not layers:
        return {}
    active = np.concatenate([layer._host_counters()["active"] for layer in layers])
    return {"lifecycle/dead": float((~active).mean())}
