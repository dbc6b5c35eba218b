from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from rlplastic.init import torch_default_init
from rlplastic.interventions.base import Every, InitFn, Intervention, recycle_units
from rlplastic.introspection import hidden_features, recyclable_layers

LayerPairs = Sequence[tuple[nn.Module, Sequence[nn.Module]]]


def neuron_scores(activations: torch.Tensor) -> torch.Tensor:
    """ReDo's score per unit: mean |activation| over the batch (and spatial positions for conv
    channels), divided by the layer's mean score (+1e-9). (N, units[, H, W]) -> (units,)."""
    dims = [0, *range(2, activations.dim())]
    score = activations.abs().mean(dim=dims)
    return score / (score.mean() + 1e-9)


class ReDo(Intervention):
    """Recycling dormant neurons (Sokar et al. 2023, "The Dormant Neuron Phenomenon in Deep RL").

    Every `every` steps, on a batch from `batch_fn` (the paper uses 256 samples), a hidden unit is
    dormant when its score (see neuron_scores) is <= tau. A dormant unit gets fresh incoming
    weights (from `init_fn`, the network's scheme; by default the layer's own reset_parameters), a
    zero bias and zero outgoing weights; the optimizer's moments at those entries are zeroed, its
    step count is kept. Output layers are never
    recycled. Scores are taken on what the units deliver to the next layer (after their norm and
    activation, as the paper scores post-activation outputs).

    Layers are found by tracing the model (base.recyclable_layers): a layer whose output joins a
    residual stream is not recycled (zeroing its outgoing weights would cut the identity path's
    channel too). Pass `layers` as (layer, [layers it feeds]) pairs for models fx cannot trace.
    """

    state_keys = ("due", "recycled")

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        batch_fn: Callable[[], torch.Tensor],
        tau: float = 0.1,
        every: int = 1_000,
        init_fn: InitFn = torch_default_init,
        layers: LayerPairs | None = None,
    ):
        if tau < 0:
            raise ValueError(f"tau {tau}: must be >= 0")
        self.model, self.optimizer, self.batch_fn = model, optimizer, batch_fn
        self.tau, self.init_fn = tau, init_fn
        self.layers = [(layer, list(following)) for layer, following in (layers or recyclable_layers(model))]
        self.due = Every(every)
        self.recycled: list[int] = []  # units recycled at each application, for logging

    def metrics(self) -> dict[str, float]:
        """Units recycled in all and at the last pass (counted when recycling: no extra sync)."""
        return {"recycled": sum(self.recycled), "recycled_last": self.recycled[-1] if self.recycled else 0}

    def host_step(self) -> None:
        if self.due():
            self.apply(self.batch_fn())

    def dormant_masks(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        """One boolean mask of dormant units per hidden layer, scored on `inputs`."""
        return [neuron_scores(h) <= self.tau for h in hidden_features(self.model, self.layers, inputs)]

    @torch.no_grad()
    def apply(self, inputs: torch.Tensor) -> int:
        """Score on `inputs` and recycle the dormant units now; returns how many."""
        total = 0
        for (layer, following), dormant in zip(self.layers, self.dormant_masks(inputs), strict=True):
            units = dormant.nonzero().flatten()
            total += len(units)  # the one host sync, once per `every` steps
            if len(units) == 0:
                continue
            recycle_units(layer, following, units, self.init_fn, self.optimizer)
        self.recycled.append(total)
        return total
