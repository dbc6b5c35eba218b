"""What every intervention shares: fresh draws, optimizer-state surgery, unit recycling and the
Intervention contract. Finding the hidden layers is rlplastic.introspection's."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn

InitFn = Callable[[nn.Module], None]


@torch.no_grad()
def fresh_copy(module: nn.Module, init_fn: InitFn) -> nn.Module:
    """A copy of `module` re-drawn by `init_fn`: what its constructor would have produced."""
    fresh = copy.deepcopy(module)
    fresh.apply(init_fn)
    return fresh


@torch.no_grad()
def clear_optimizer_state(optimizer: torch.optim.Optimizer | None, params: Iterable[torch.Tensor]) -> None:
    """Give whole replaced tensors a fresh optimizer state.

    Adam-style state (it has a step count) is zeroed in place, step included: numerically the state
    the optimizer would create on its next step, and the tensors keep their memory, which a
    CUDA-graph-captured optimizer step goes on reading. Other state (SGD momentum, whose fresh value
    is the next gradient, not zero) is dropped, and the optimizer re-creates it."""
    if optimizer is None:
        return
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        if "step" in state:
            for key, value in state.items():
                if torch.is_tensor(value):
                    value.zero_()
                else:
                    state[key] = type(value)(0)
        else:
            optimizer.state.pop(p)


@torch.no_grad()
def zero_optimizer_state(
    optimizer: torch.optim.Optimizer | None, param: torch.Tensor, index: torch.Tensor, dim: int = 0
) -> None:
    """Zero every per-entry state tensor (Adam's moments, SGD's momentum) of `param` at `index`
    along `dim`; scalar state such as Adam's step count is kept, as ReDo prescribes."""
    if optimizer is None or param not in optimizer.state:
        return
    for value in optimizer.state[param].values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.index_fill_(dim, index, 0)


def outgoing_columns(layer: nn.Module, next_layer: nn.Module, units: torch.Tensor) -> torch.Tensor:
    """Input columns of `next_layer` fed by `units` of `layer`. A conv channel feeding a linear
    layer through a (channel-major) flatten owns a block of spatial positions."""
    if isinstance(layer, nn.Conv2d) and isinstance(next_layer, nn.Linear):
        spatial = next_layer.in_features // layer.out_channels
        offsets = torch.arange(spatial, device=units.device)
        return (units[:, None] * spatial + offsets[None, :]).flatten()
    return units


@torch.no_grad()
def recycle_units(
    layer: nn.Module,
    following: Iterable[nn.Module],
    units: torch.Tensor,
    init_fn: InitFn,
    optimizer: torch.optim.Optimizer | None,
) -> None:
    """Give `units` of `layer` fresh incoming weights (init_fn) and a zero bias, zero their outgoing
    weights in every following layer, and zero the optimizer moments at all those entries."""
    fresh = fresh_copy(layer, init_fn)
    layer.weight.index_copy_(0, units, fresh.weight.index_select(0, units))
    zero_optimizer_state(optimizer, layer.weight, units, 0)
    if layer.bias is not None:
        layer.bias.index_fill_(0, units, 0.0)
        zero_optimizer_state(optimizer, layer.bias, units, 0)
    for next_layer in following:
        columns = outgoing_columns(layer, next_layer, units)
        next_layer.weight.index_fill_(1, columns, 0.0)
        zero_optimizer_state(optimizer, next_layer.weight, columns, 1)


class Intervention:
    """The common contract: step() once per gradient step; state_dict() / load_state_dict() carry
    the schedule and statistics across a resumed run (parameters live in the model's own).

    step() = device_step() + host_step(); subclasses implement those two, never step(). device_step()
    is the per-step tensor work, free of host syncs and Python decisions, so an agent may capture it
    in a CUDA graph with its update; host_step() keeps the schedule and runs the rare events (resets,
    recycling) outside the graph, changing parameters and optimizer state in place so the captured
    graph needs no re-capture. graph_safe says whether the intervention's device work may be
    captured at all (every intervention here: the ones that hook into the forward or the optimizer,
    continual backprop and gradient noise, write into fixed buffers and count on the device); an
    agent keeps an eager update for one that is not. Calling all device_steps, then all host_steps,
    is the same as calling each step() in turn as long as only one intervention has device work
    (tested with the DrQ interventions).
    """

    state_keys: tuple[str, ...] = ()
    graph_safe: bool = True

    def step(self) -> None:
        self.device_step()
        self.host_step()

    def device_step(self) -> None:
        """Per-step tensor work (none by default)."""

    def host_step(self) -> None:
        """Schedule and rare events (none by default)."""

    def metrics(self) -> dict[str, float]:
        """What the intervention has done so far (resets, units recycled, noise scale), read from
        host-side counters: no device sync. Logged by agents as interventions/<name>/<key>."""
        return {}

    def state_dict(self) -> dict:
        """Plain data only (tensors, numbers, lists, dicts): a checkpoint holding it loads with
        torch.load(weights_only=True). A schedule (Every) travels as its period and count."""
        return {key: _plain_state(copy.deepcopy(getattr(self, key))) for key in self.state_keys}

    def load_state_dict(self, state: dict) -> None:
        for key in self.state_keys:
            setattr(self, key, _from_plain_state(copy.deepcopy(state[key])))


def _plain_state(value):
    return {"every_period": value.period, "every_count": value.count} if isinstance(value, Every) else value


def _from_plain_state(value):
    if isinstance(value, dict) and set(value) == {"every_period", "every_count"}:
        schedule = Every(int(value["every_period"]))
        schedule.count = int(value["every_count"])
        return schedule
    return value


class Every:
    """True once every `period` calls (never for period 0)."""

    def __init__(self, period: int):
        if period < 0:
            raise ValueError(f"period {period}: must be >= 0 (0 = never)")
        self.period, self.count = period, 0

    def __call__(self) -> bool:
        self.count += 1
        return self.period > 0 and self.count % self.period == 0


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


class Interventions:
    """A list of interventions used as one: device_step() then host_step() of each after every
    optimizer step (step() does both), state_dict() / load_state_dict() for checkpoints, metrics()
    with each one's activity under its name (hare_tortoise/resets, re_do/recycled, ...), and
    graph_safe when every member may be captured in a CUDA graph.

        interventions = Interventions([HareTortoise(q, q_target, 0.995, 4000), ReDo(q, opt, batch_fn)])
        ...; optimizer.step(); interventions.step()
    """

    def __init__(self, items: Iterable[Intervention] = ()):
        self.items = list(items)

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def graph_safe(self) -> bool:
        return all(item.graph_safe for item in self.items)

    def device_step(self) -> None:
        for item in self.items:
            item.device_step()

    def host_step(self) -> None:
        for item in self.items:
            item.host_step()

    def step(self) -> None:
        self.device_step()
        self.host_step()

    def metrics(self) -> dict[str, float]:
        return {f"{_snake(type(item).__name__)}/{key}": value for item in self.items
                for key, value in item.metrics().items()}  # fmt: skip

    def state_dict(self) -> list[dict]:
        return [item.state_dict() for item in self.items]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != len(self.items):
            raise ValueError(f"{len(states)} saved intervention states for {len(self.items)} interventions")
        for item, state in zip(self.items, states, strict=True):
            item.load_state_dict(state)
