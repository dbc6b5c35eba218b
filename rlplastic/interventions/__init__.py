"""Plasticity interventions that plug into any PyTorch agent or training loop.

Each is a small class built with the modules (and optimizer) it acts on and its own schedule; call
its step() once per gradient step, after optimizer.step(). Parameters change in place, so the
optimizer's references stay valid, and the optimizer state of every touched entry is reset.

    interventions = Interventions([HareTortoise(hare=q, tortoise=q_target, momentum=0.995, reset_every=4000)])
    ...
    optimizer.step()
    interventions.step()
    writer.add_scalars(...)  # interventions.metrics(): resets, units recycled, noise scale
"""

from rlplastic.interventions.base import Interventions, clear_optimizer_state, fresh_copy, zero_optimizer_state
from rlplastic.interventions.continual_backprop import ContinualBackprop
from rlplastic.interventions.gradient_noise import GradientNoise
from rlplastic.interventions.hare_tortoise import HareTortoise
from rlplastic.interventions.lifecycle import LifecycleConv2d, LifecycleLinear, lifecycle_metrics, swap_in_lifecycle
from rlplastic.interventions.options import (
    ALL_METHODS,
    InterventionOptions,
    build_interventions,
    ema_target,
    swap_in_chosen_lifecycle,
)
from rlplastic.interventions.redo import ReDo, neuron_scores
from rlplastic.interventions.shrink_perturb import HeadReset, ShrinkPerturb
from rlplastic.introspection import hidden_layers

__all__ = [
    "ALL_METHODS",
    "InterventionOptions",
    "build_interventions",
    "ema_target",
    "swap_in_chosen_lifecycle",
    "ContinualBackprop",
    "GradientNoise",
    "HareTortoise",
    "HeadReset",
    "Interventions",
    "LifecycleConv2d",
    "LifecycleLinear",
    "ReDo",
    "ShrinkPerturb",
    "clear_optimizer_state",
    "fresh_copy",
    "hidden_layers",
    "lifecycle_metrics",
    "neuron_scores",
    "swap_in_lifecycle",
    "zero_optimizer_state",
]
