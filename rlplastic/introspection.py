"""Model introspection shared by the interventions and the diagnostics: which Linear / Conv2d
layers are hidden, which layers each one feeds, whether its units reach them one to one, and what
its units deliver to the next layer. Found by tracing the model's forward with torch.fx."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import fx, nn

from rlplastic.init import LAYER_TYPES


class _LayerLeafTracer(fx.Tracer):
    """Stops at every Linear / Conv2d, subclasses such as lifecycle layers included."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LAYER_TYPES) or super().is_leaf_module(m, module_qualified_name)


# Modules and functions that act on each unit alone (or only rescale it), so unit i of a layer is
# still unit i of the next layer's input after them. Padding modules pad each channel on its own
# (DrQ's TensorFlow-style 'SAME' convolutions are a ZeroPad2d before each Conv2d): leaving them out
# made every padded layer look unit-mixing, and ReDo and continual backprop skipped it.
# Every elementwise activation counts (a missing one silently took its layer out of recycling).
UNITWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.LogSigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.Identity, nn.Flatten,
    nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd, nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd, nn.modules.padding._CircularPadNd,
)  # fmt: skip
_JOINS = {operator.add, operator.sub, operator.iadd, torch.add, torch.sub, "add", "sub", "add_"}
_REINDEXING = {torch.cat, torch.stack, torch.concat}  # unit i lands elsewhere (CReLU's [relu(x), -relu(-x)])


# What makes a value >= 0 (an activation whose outputs are never negative) and what keeps a value
# >= 0 when its input is (reshaping, dropout's scaling, max / average pooling, zero padding).
_NONNEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
_NONNEGATIVE_CALLS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.sigmoid,
                      torch.nn.functional.sigmoid, torch.nn.functional.softplus, "relu", "sigmoid"}  # fmt: skip
_SIGN_KEEPING_MODULES = (
    nn.Flatten, nn.Identity, nn.modules.dropout._DropoutNd, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
)  # fmt: skip
_SIGN_KEEPING_CALLS = {torch.flatten, torch.nn.functional.dropout, torch.nn.functional.max_pool2d,
                       torch.nn.functional.avg_pool2d, "flatten", "view", "reshape", "contiguous"}  # fmt: skip


class LayerLink(NamedTuple):
    """A hidden layer, the layers its output feeds, and whether its units reach them one to one:
    False when the path joins another tensor on the way (a residual sum, a concatenation) or passes
    through a module that mixes units (attention, a whole transformer block). nonnegative: what the
    first following layer receives is >= 0 whatever the weights (it comes out of a ReLU or another
    non-negative activation through reshaping, pooling, dropout or zero padding only), so that the
    sum of |h| over a batch is the sum of h."""

    layer: nn.Module
    following: list[nn.Module]
    unitwise: bool
    nonnegative: bool = False


def layer_links(model: nn.Module) -> list[LayerLink]:
    """Every Linear / Conv2d whose output reaches another layer, found by tracing the model with
    torch.fx and following each layer's output through activations, norms, pooling, flattening
    and arithmetic to the next layers (so branching heads such as dueling streams are handled).
    Output layers are left out."""
    return trace_layers(model)[0]


def trace_layers(model: nn.Module) -> tuple[list[LayerLink], list[nn.Module]]:
    """(the hidden layers' links, the output layers) of the model's forward, from one fx trace."""
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
        receivers = [n for n in path if is_layer(n) and n is not node and modules[n.target] is following[0]]
        nonnegative = all(bool(r.args) and _nonnegative(r.args[0], node, modules) for r in receivers)
        links.append(LayerLink(modules[node.target], following, unitwise, nonnegative))
    return links, outputs


def _nonnegative(value: fx.Node, layer: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether `value` (a node on the path from `layer`) is >= 0 by construction: walking back
    through sign-keeping steps, the first step that changes values must be a non-negative activation."""
    while isinstance(value, fx.Node) and value is not layer:
        if value.op == "call_module":
            module = modules[value.target]
            if isinstance(module, _NONNEGATIVE_MODULES):
                return True
            keeps = isinstance(module, _SIGN_KEEPING_MODULES) or (
                isinstance(module, nn.modules.padding._ConstantPadNd) and module.value >= 0
            )
        elif value.op in ("call_function", "call_method"):
            if value.target in _NONNEGATIVE_CALLS:
                return True
            keeps = value.target in _SIGN_KEEPING_CALLS
        else:
            keeps = False
        if not keeps or not value.args:
            return False
        value = value.args[0]
    return False


def _node_args(node: fx.Node) -> list[fx.Node]:
    args: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), args.append)
    return args


def hidden_layers(model: nn.Module) -> list[tuple[nn.Module, list[nn.Module]]]:
    """(layer, the layers its output feeds) for every hidden Linear / Conv2d (see layer_links):
    what diagnostics probe and lifecycle layers may replace. Pass the pairs explicitly for models
    fx cannot trace."""
    return [(link.layer, link.following) for link in layer_links(model)]


def recyclable_links(model: nn.Module) -> list[LayerLink]:
    """The links of the hidden layers whose units reach the next layers one to one, so that a unit
    can be recycled by re-drawing its incoming weights and zeroing its outgoing ones (ReDo,
    continual backprop). A layer whose output joins a residual stream is left out: its channel of
    the stream also carries the identity path, so zeroing the next layer's weights on that channel
    would cut the whole residual channel, not the unit."""
    return [link for link in layer_links(model) if link.unitwise]


def recyclable_layers(model: nn.Module) -> list[tuple[nn.Module, list[nn.Module]]]:
    """(layer, the layers its output feeds) of recyclable_links."""
    return [(link.layer, link.following) for link in recyclable_links(model)]


def output_layers(model: nn.Module) -> list[nn.Module]:
    """The Linear / Conv2d layers of the forward whose output reaches no other layer (the heads)."""
    return trace_layers(model)[1]


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


def num_units(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
