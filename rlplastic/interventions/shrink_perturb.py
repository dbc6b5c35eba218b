from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from rlplastic.init import torch_default_init
from rlplastic.interventions.base import Every, InitFn, Intervention, clear_optimizer_state, fresh_copy


class ShrinkPerturb(Intervention):
    """Shrink & Perturb (Ash & Adams 2020), per submodule.

    Every `every` steps each listed submodule gets theta <- shrink * theta + perturb * phi, where phi
    is a fresh draw of the submodule's own init (`init_fn`, the network's scheme; by default each
    layer's reset_parameters) or, with toward="initial", the parameters it had when this object was
    built. Then the optimizer state of every touched parameter is cleared.

    `groups` maps submodule names (as in model.named_modules(); "" is the whole model) to
    (shrink, perturb): Ash & Adams' defaults are (0.4, 0.1); the warm-start study shrinks toward the
    original init with (0.2, 0.8); (0, 1) is a full re-initialization; BBF's reset is
    {"encoder": (0.5, 0.5), "transition": (0.5, 0.5), "projection": (0, 1), "head": (0, 1)}.
    Floating-point buffers (BatchNorm statistics) are re-drawn only where shrink is 0; integer and
    boolean buffers are counters of the network's own steps (BatchNorm's batch count, a lifecycle
    layer's clock and which of its units are alive) and stay, as in HareTortoise's reset: copied
    from a snapshot they would move a lifecycle layer's counters apart from the host mirror that
    decides its deaths and revivals.

    Pass several models (e.g. an online network and its target) to give each the same treatment
    with its own fresh draw, as BBF does.
    """

    state_keys = ("due", "resets")

    def __init__(
        self,
        models: nn.Module | Sequence[nn.Module],
        groups: Mapping[str, tuple[float, float]] | None = None,
        every: int = 0,
        optimizer: torch.optim.Optimizer | None = None,
        init_fn: InitFn = torch_default_init,
        toward: str = "fresh",
    ):
        self.models = [models] if isinstance(models, nn.Module) else list(models)
        self.groups = dict(groups if groups is not None else {"": (0.4, 0.1)})
        if toward not in ("fresh", "initial"):
            raise ValueError(f"toward {toward!r}: allowed 'fresh' or 'initial'")
        for model in self.models:
            names = dict(model.named_modules())
            missing = [name for name in self.groups if name not in names]
            if missing:
                allowed = ", ".join(repr(n) for n in names if n and "." not in n)
                raise ValueError(f"no submodule named {missing} in {type(model).__name__}; top-level ones: {allowed}")
        self.every, self.optimizer, self.init_fn, self.toward = every, optimizer, init_fn, toward
        self.due = Every(every)
        self.initial = None
        if toward == "initial":
            self.initial = [
                {name: copy.deepcopy(model.get_submodule(name)) for name in self.groups} for model in self.models
            ]
        self.resets = 0

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.initial is not None:  # the snapshots toward which it shrinks, as plain state dicts
            state["initial"] = [{name: m.state_dict() for name, m in snaps.items()} for snaps in self.initial]
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.initial is not None and state.get("initial") is not None:
            for snaps, saved in zip(self.initial, state["initial"], strict=True):
                for name, module in snaps.items():
                    module.load_state_dict(saved[name])

    def metrics(self) -> dict[str, float]:
        return {"resets": self.resets}

    def host_step(self) -> None:
        if self.due():
            self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Shrink and perturb now, whatever the schedule."""
        for i, model in enumerate(self.models):
            for name, (shrink, perturb) in self.groups.items():
                module = model.get_submodule(name)
                source = self.initial[i][name] if self.initial is not None else fresh_copy(module, self.init_fn)
                params = list(module.parameters())
                torch._foreach_mul_(params, shrink)
                torch._foreach_add_(params, list(source.parameters()), alpha=perturb)
                if shrink == 0:
                    for buffer, fresh_buffer in zip(module.buffers(), source.buffers(), strict=True):
                        if buffer.is_floating_point():
                            buffer.copy_(fresh_buffer)
                clear_optimizer_state(self.optimizer, params)
        self.resets += 1


class HeadReset(ShrinkPerturb):
    """Reset the named submodules to a fresh init every `every` steps (Nikishin et al. 2022,
    "The Primacy Bias in Deep RL"): Shrink & Perturb with shrink 0, perturb 1."""

    def __init__(
        self,
        models: nn.Module | Sequence[nn.Module],
        names: Sequence[str],
        every: int,
        optimizer: torch.optim.Optimizer | None = None,
        init_fn: InitFn = torch_default_init,
    ):
        super().__init__(models, {name: (0.0, 1.0) for name in names}, every, optimizer, init_fn)
