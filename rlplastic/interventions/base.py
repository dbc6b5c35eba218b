"""What every intervention shares: fresh draws, optimizer-state surgery, and finding hidden layers."""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import fx, nn

from rlplastic.init import LAYER_TYPES

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


class _LayerLeafTracer(fx.Tracer):
    """Stops at every Linear / Conv2d, subclasses such as lifecycle layers included."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LAYER_TYPES) or super().is_leaf_module(m, module_qualified_name)


# Modules and functions that act on each unit alone (or only rescale it), so unit i of a layer is
# still unit i of the next layer's input after them.
UNITWISE_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Flatten,
    nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
_JOINS = {operator.add, operator.sub, operator.iadd, torch.add, torch.sub, "add", "sub", "add_"}
_REINDEXING = {torch.cat, torch.stack, torch.concat}  # unit i lands elsewhere (CReLU's [relu(x), -relu(-x)])


class LayerLink(NamedTuple):
    """A hidden layer, the layers its output feeds, and whether its units reach them one to one:
    False when the path joins another tensor on the way (a residual sum, a concatenation) or passes
    through a module that mixes units (attention, a whole transformer block)."""

    layer: nn.Module
    following: list[nn.Module]
    unitwise: bool


def layer_links(model: nn.Module) -> list[LayerLink]:
    """Every Linear / Conv2d whose output reaches another layer, found by tracing the model with
    torch.fx and following each layer's output through activations, norms, pooling, flattening
    and arithmetic to the next layers (so branching heads such as dueling streams are handled).
    Output layers are left out."""
    return _trace_layers(model)[0]


def _trace_layers(model: nn.Module) -> tuple[list[LayerLink], list[nn.Module]]:
    """(the hidden layers' links, the output layers) of the model's forward."""
    graph = _LayerLeafTracer().trace(model)
    modules = dict(model.named_modules())

    def is_layer(node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(modules[node.target], LAYER_TYPES)

    links, outputs = [], []
    for node in graph.nodes:
        if not is_layer(node):
            continue
        following, frontier, path = [], list(node.users), {node}
        while frontier:
            user = frontier.pop()
            if user in path:
                continue
            path.add(user)
            if is_layer(user):
                following.append(modules[user.target])
            else:
                frontier.extend(user.users)
        if not following:
            outputs.append(modules[node.target])
            continue
        unitwise = True
        for user in path - {node} - {n for n in path if is_layer(n)}:
            if user.op == "call_module" and not isinstance(modules[user.target], UNITWISE_MODULES):
                unitwise = False  # a leaf module that may mix units
            elif user.target in _REINDEXING:
                unitwise = False
            elif user.target in _JOINS and any(arg not in path and arg.op != "get_attr" for arg in _node_args(user)):
                unitwise = False  # joined with a tensor that does not come from this layer
        links.append(LayerLink(modules[node.target], following, unitwise))
    return links, outputs


def _node_args(node: fx.Node) -> list[fx.Node]:
    args: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), args.append)
    return args


def hidden_layers(model: nn.Module) -> list[tuple[nn.Module, list[nn.Module]]]:
    """(layer, the layers its output feeds) for every hidden Linear / Conv2d (see layer_links):
    what diagnostics probe and lifecycle layers may replace. Pass the pairs explicitly for models
    fx cannot trace."""
    return [(link.layer, link.following) for link in layer_links(model)]


def recyclable_layers(model: nn.Module) -> list[tuple[nn.Module, list[nn.Module]]]:
    """The hidden layers whose units reach the next layers one to one, so that a unit can be
    recycled by re-drawing its incoming weights and zeroing its outgoing ones (ReDo, continual
    backprop). A layer whose output joins a residual stream is left out: its channel of the stream
    also carries the identity path, so zeroing the next layer's weights on that channel would cut
    the whole residual channel, not the unit."""
    return [(link.layer, link.following) for link in layer_links(model) if link.unitwise]


def output_layers(model: nn.Module) -> list[nn.Module]:
    """The Linear / Conv2d layers of the forward whose output reaches no other layer (the heads)."""
    return _trace_layers(model)[1]


def received_features(layer: nn.Module, received: torch.Tensor) -> torch.Tensor:
    """The input a following layer received, with the units of `layer` on dim 1: (N, units) or
    (N, units, positions...). Conv channels flattened into a linear layer (channel-major) regain
    their positions; a linear layer applied over tokens (N, T, units) has its units moved to dim 1.
    Where the path re-indexes units (a concatenation), dim 1 holds the next layer's input columns."""
    if isinstance(layer, nn.Linear) and received.dim() > 2:
        return received.movedim(-1, 1)
    units = num_units(layer)
    if isinstance(layer, nn.Conv2d) and received.dim() == 2 and received.shape[1] != units:
        if received.shape[1] % units == 0:
            return received.reshape(received.shape[0], units, -1)
    return received


@torch.no_grad()
def hidden_features(
    model: nn.Module, pairs: Sequence[tuple[nn.Module, Sequence[nn.Module]]], inputs: torch.Tensor
) -> list[torch.Tensor]:
    """What each hidden layer's units deliver to the next layer (after its norm and activation: the
    input the first following layer receives), on one eval-mode forward of `inputs`; the model's
    mode and hooks are restored afterwards."""
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for i, (layer, following) in enumerate(pairs):
        record = lambda _m, args, i=i, layer=layer: captured.__setitem__(i, received_features(layer, args[0]))  # noqa: E731
        hooks.append(following[0].register_forward_pre_hook(record))
    was_training = model.training
    try:
        model.eval()
        model(inputs)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return [captured[i] for i in range(len(pairs))]


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


def num_units(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


class Intervention:
    """The common contract: step() once per gradient step; state_dict() / load_state_dict() carry
    the schedule and statistics across a resumed run (parameters live in the model's own).

    step() = device_step() + host_step(); subclasses implement those two, never step(). device_step()
    is the per-step tensor work, free of host syncs and Python decisions, so an agent may capture it
    in a CUDA graph with its update; host_step() keeps the schedule and runs the rare events (resets,
    recycling) outside the graph, changing parameters and optimizer state in place so the captured
    graph needs no re-capture. graph_safe says whether the intervention may be captured at all;
    those that decide on the host every step or hook into the forward or the optimizer (continual
    backprop, gradient noise) are not, and the agent keeps an eager update for them. Calling all
    device_steps, then all host_steps, is the same as calling each step() in turn as long as only
    one intervention has device work (tested with the DrQ interventions).
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
