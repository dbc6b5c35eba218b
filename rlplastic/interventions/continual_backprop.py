from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rlplastic.init import torch_default_init
from rlplastic.interventions.base import InitFn, Intervention, recycle_units
from rlplastic.interventions.redo import LayerPairs
from rlplastic.introspection import num_units, received_features, recyclable_links


def _abs_sum(x: torch.Tensor, dim: int, dtype: torch.dtype | None = None, out: torch.Tensor | None = None):
    """sum |x| over `dim` (into `out` if given): one kernel on a GPU (an L1 norm); abs then sum on a
    CPU, whose L1-norm reduction is about 3x slower than the two (measured on DrQ's 512 x 7,744
    weight)."""
    if x.is_cuda:
        return torch.linalg.vector_norm(x, 1, dim=dim, dtype=dtype, out=out)
    return torch.sum(x.abs(), dim, dtype=dtype, out=out)


def _sums_per_unit(h: torch.Tensor, abs_out: torch.Tensor, sum_out: torch.Tensor) -> None:
    """sum |h| and sum h per unit of h (N, units[, positions...]) into two buffers, in place (a
    captured graph refills them); one sum when the two buffers are one (h >= 0 by construction:
    then |h| = h). Over the batch first, then over the positions: a reduction over dims 0, 2, 3 at
    once has few outputs and runs poorly parallel on a GPU (25 us per kernel for DrQ's
    (32, 64, 13, 13) activations on an H100, against a few us for each of the two steps)."""
    dtype = abs_out.dtype
    nonnegative = sum_out is abs_out
    if h.dim() == 2:
        if not nonnegative:
            _abs_sum(h, 0, dtype, out=abs_out)
        torch.sum(h, dim=0, dtype=dtype, out=sum_out)
        return
    flat = h.flatten(2)
    if nonnegative:
        torch.sum(torch.sum(flat, dim=0, dtype=dtype), dim=-1, out=abs_out)
        return
    torch.sum(_abs_sum(flat, 0, dtype), dim=-1, out=abs_out)
    torch.sum(torch.sum(flat, dim=0, dtype=dtype), dim=-1, out=sum_out)


def _fold_inputs(layer: nn.Module, next_layer: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """Per-input values of `next_layer`, shaped (..., in) or (..., in, kh, kw) like its weight's
    trailing dims, summed per unit of `layer`: over kernel taps, or over the block of flattened
    positions a conv channel owns (nothing to sum when each unit owns one input)."""
    if isinstance(next_layer, nn.Conv2d):
        return values.sum(dim=(-2, -1))
    if values.shape[-1] == num_units(layer):
        return values
    return values.reshape(*values.shape[:-1], num_units(layer), -1).sum(-1)


def _outgoing_sums(layer: nn.Module, next_layer: nn.Module) -> tuple[torch.Tensor, int]:
    """sum |w_out| per unit of `layer` over the weight of `next_layer` (its rows, and the kernel
    taps or flattened positions each unit feeds), and the number of rows to divide by for a mean
    over them. Over the rows first (many outputs, coalesced reads), then the small fold."""
    weight = next_layer.weight
    return _fold_inputs(layer, next_layer, _abs_sum(weight, 0)), weight.shape[0]


class ContinualBackprop(Intervention):
    """Continual backpropagation (Dohare et al. 2024, "Loss of plasticity in deep continual learning").

    Each hidden unit keeps a utility, an EMA (decay rho) of |h| * mean |w_out| with h its activation
    on the training batch, and an EMA of h; both are bias-corrected by 1 - rho^age. Each step a
    fraction `replacement_rate` of the mature units (age > maturity) is due for replacement (the
    fraction accumulates across steps: Dohare et al.'s replacement rate, the number of units
    replaced per step and layer being rate x eligible units, its fractional part carried over);
    the due units with the lowest corrected utility get fresh incoming weights drawn by the
    network's own initializer (init_fn: by default the layer's reset_parameters, i.e. PyTorch's
    init; pass the scheme the network was built with, as the agents do with their xavier init),
    a zero bias and zero outgoing weights, their age and statistics
    reset, and their mean contribution w_out * mean(h) is added to the next layer's bias so the
    network's output does not jump. Optimizer moments at the touched entries are zeroed.

    h is what the unit delivers to the next layer (after its norm and activation), captured by a
    forward pre-hook on the first following layer on forwards that build a graph in training mode
    (the update's forward, not target or acting forwards) into buffers of fixed shape; call step()
    after optimizer.step(). Layers whose output joins a residual stream are not replaced
    (introspection.recyclable_links). Where tracing shows that a layer's output reaches the next
    layer through a ReLU (or another non-negative activation), the sums of |h| and of h are one
    reduction, not two.

    Graph-safe: device_step() (the utility and mean-activation EMAs from the last training forward,
    the ages) is device work an agent may capture in a CUDA graph with its update; host_step()
    counts ages on the host, accumulates the replacement fraction and replaces units when one is
    due (the rare event, in place, outside the graph).
    """

    state_keys = ("state", "replaced")

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        replacement_rate: float = 1e-4,
        decay: float = 0.99,
        maturity: int = 100,
        init_fn: InitFn = torch_default_init,
        layers: LayerPairs | None = None,
    ):
        if not 0 <= replacement_rate <= 1:
            raise ValueError(f"replacement_rate {replacement_rate}: must lie in [0, 1]")
        if not 0 <= decay < 1:
            raise ValueError(f"decay {decay}: must lie in [0, 1)")
        self.model, self.optimizer = model, optimizer
        self.replacement_rate, self.decay, self.maturity = replacement_rate, decay, maturity
        self.init_fn = init_fn
        if layers is None:  # traced: also whether each layer's output reaches the next one >= 0
            links = recyclable_links(model)
            nonnegative = [link.nonnegative for link in links]
            layers = [(link.layer, link.following) for link in links]
        else:
            nonnegative = [False] * len(layers)
        self.layers = [(layer, list(following)) for layer, following in layers]
        self.state = []
        for (layer, _), positive in zip(self.layers, nonnegative, strict=True):
            units, device = num_units(layer), layer.weight.device
            batch_abs = torch.zeros(units, device=device)
            self.state.append(
                {
                    "utility": torch.zeros(units, device=device),
                    "mean_activation": torch.zeros(units, device=device),
                    "age": torch.zeros(units, device=device),
                    "host_age": np.zeros(units, dtype=np.int64),  # mirror: eligibility without a sync
                    "due": 0.0,
                    # the last training forward's sums of |h| and h per unit, over `count` values each;
                    # one tensor when h >= 0 by construction (after a ReLU |h| = h: one reduction less)
                    "batch_abs": batch_abs,
                    "batch_mean": batch_abs if positive else torch.zeros(units, device=device),
                    "count": 1,
                    "fed": False,  # whether a training forward has filled the three above yet
                }
            )
        # a factor of 1 per layer in the fused update: constant, so not part of the saved state
        self._ones = [torch.ones_like(state["age"]) for state in self.state]
        self._hooks = [
            following[0].register_forward_pre_hook(lambda m, args, i=i: self._capture(i, m, args[0]))
            for i, (_, following) in enumerate(self.layers)
        ]
        self.replaced = 0

    def _capture(self, index: int, receiver: nn.Module, received: torch.Tensor) -> None:
        if not (receiver.training and torch.is_grad_enabled()):
            return
        h = received_features(self.layers[index][0], received.detach())
        state = self.state[index]
        _sums_per_unit(h, state["batch_abs"], state["batch_mean"])  # sums: device_step divides
        state["count"] = h.numel() // h.shape[1]
        state["fed"] = True

    def metrics(self) -> dict[str, float]:
        return {"replaced": self.replaced}

    def load_state_dict(self, state: dict) -> None:
        """Saved statistics go into the existing tensors, in place: a captured graph reads those."""
        self.replaced = state["replaced"]
        for mine, saved in zip(self.state, state["state"], strict=True):
            for key, value in saved.items():
                if torch.is_tensor(mine[key]) and value is not None:
                    mine[key].copy_(value)
                elif not torch.is_tensor(mine[key]):
                    mine[key] = value.copy() if isinstance(value, np.ndarray) else value

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    @torch.no_grad()
    def device_step(self) -> None:
        """The utility and mean-activation EMAs and the ages: device work, graph-capturable. Per
        layer one reduction of |w_out| per following layer; the rest is two fused (foreach)
        kernels for all layers: about two kernels per layer and step with the training forward's
        two reductions."""
        fed = [(layer, following, state, ones) for (layer, following), state, ones
               in zip(self.layers, self.state, self._ones, strict=True) if state["fed"]]  # fmt: skip
        if not fed:
            return
        out_sums, scales = [], []
        for layer, following, state, _ in fed:
            # mean |w_out| over the rows of each following layer, averaged over those layers
            sums = [_outgoing_sums(layer, nxt) for nxt in following]
            total, rows = sums[0]
            for extra, extra_rows in sums[1:]:
                total = total.add(extra, alpha=rows / extra_rows)  # in units of the first layer's rows
            out_sums.append(total)
            scales.append(1.0 / (rows * len(following) * state["count"]))
        states, ones = [state for _, _, state, _ in fed], [ones for *_, ones in fed]
        utilities, means, ages = ([state[key] for state in states] for key in ("utility", "mean_activation", "age"))
        # x <- decay x + (1 - decay) * scale * a * b for the utilities (a, b: the sums of |h| and of
        # |w_out|) and the mean activations (a: the sum of h, b: 1); age <- age + 1 * 1 * 1
        step = 1 - self.decay
        torch._foreach_mul_([*utilities, *means, *ages], [self.decay] * (2 * len(states)) + [1.0] * len(states))
        torch._foreach_addcmul_(
            [*utilities, *means, *ages],
            [*(state["batch_abs"] for state in states), *(state["batch_mean"] for state in states), *ones],
            [*out_sums, *ones, *ones],
            [step * scale for scale in scales] + [step / state["count"] for state in states] + [1.0] * len(states),
        )

    def host_step(self) -> None:
        """Ages on the host, the replacement fraction, and the replacements when due (rare)."""
        for (layer, following), state in zip(self.layers, self.state, strict=True):
            if not state["fed"]:
                continue
            state["host_age"] += 1
            eligible = int((state["host_age"] > self.maturity).sum())
            state["due"] += self.replacement_rate * eligible
            count = int(state["due"])
            if count >= 1:
                state["due"] -= count
                self._replace(layer, following, state, count)

    @torch.no_grad()
    def _replace(self, layer: nn.Module, following: list[nn.Module], state: dict, count: int) -> None:
        correction = 1 - self.decay ** state["age"]
        utility = state["utility"] / correction
        utility = torch.where(state["age"] > self.maturity, utility, torch.inf)
        units = torch.topk(utility, count, largest=False).indices
        mean_activation = (state["mean_activation"] / correction)[units]
        for nxt in following:  # before the outgoing weights are zeroed: keep the output where it was
            if nxt.bias is not None:
                contribution = _fold_inputs(layer, nxt, nxt.weight)[:, units] * mean_activation
                nxt.bias.add_(contribution.sum(1))
        recycle_units(layer, following, units, self.init_fn, self.optimizer)
        for key in ("utility", "mean_activation", "age"):
            state[key].index_fill_(0, units, 0.0)
        state["host_age"][units.cpu().numpy()] = 0  # the one host sync, only when units are replaced
        self.replaced += count
