"""Initialization schemes, as functions of one module (for `model.apply` and fresh re-inits)."""

from __future__ import annotations

from torch import nn

LAYER_TYPES = (nn.Linear, nn.Conv2d)


def xavier_uniform_zero_bias(module: nn.Module) -> None:
    """The DrQ / BBF reference init: xavier_uniform weights, zero biases."""
    if isinstance(module, LAYER_TYPES):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def he_uniform_zero_bias(module: nn.Module) -> None:
    """Kaiming (He) uniform weights for ReLU, zero biases."""
    if isinstance(module, LAYER_TYPES):
        nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def torch_default_init(module: nn.Module) -> None:
    """What nn.Linear / nn.Conv2d's own constructors draw."""
    if isinstance(module, LAYER_TYPES):
        module.reset_parameters()
