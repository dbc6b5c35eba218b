"""Many runs of one agent in one process: N networks of one architecture stepped as one.

    stacked = StackedModules([q_1, ..., q_N])       # q_i's parameters now live in stacked tensors
    optimizers = [torch.optim.Adam(q.parameters()) for q in (q_1, ..., q_N)]
    losses = torch.func.vmap(run_loss)(stacked.params, states)   # (N,): one batched forward
    losses.sum().backward()                            # each run's gradient is its own loss's
    stacked.scatter_grads()                            # q_i.weight.grad = stacked grad [i], a view
    for optimizer in optimizers: optimizer.step()      # in place, into the stacked storage

Each run keeps its own module, whose parameters are views into the stacked tensors: its optimizer,
interventions (in-place resets, EMA targets, recycled units), diagnostics, checkpoints and
evaluation act on that module as in a single run and touch no other run, while the forward and
backward of all runs is one call (torch.func.vmap over torch.func.functional_call). On a GPU that
turns N launch-bound updates into one; the arithmetic of each run is the same as alone, up to the
order of floating-point sums in the batched kernels.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from rlplastic.envs.atari import canonical_game
from rlplastic.replay import FrameReplay
from rlplastic.runs import flat_config


class StackedModules:
    """N modules of one architecture whose parameters (and buffers) are stacked along a new first
    dimension; each module keeps its own Parameter objects, now views of the stacked storage.
    Build it before optimizers and interventions see the modules: they must hold the views.

    A tensor may differ between the modules in its first dimension only (e.g. output layers of
    games with different numbers of actions): it is stacked zero-padded to the largest, each
    module's view holding its own rows; the batched forward sees the padded rows, so a forward
    that reduces over them must be told which are real (DrQ's masks its actions)."""

    def __init__(self, modules: Sequence[nn.Module]):
        if not modules:
            raise ValueError("StackedModules needs at least one module")
        shapes = [[(name, p.dim(), p.shape[1:]) for name, p in m.named_parameters()] for m in modules]
        if any(s != shapes[0] for s in shapes):
            raise ValueError("StackedModules needs modules of one architecture (same parameter names and shapes, "
                             "but for the first dimension)")  # fmt: skip
        self.modules = list(modules)
        self.base = copy.deepcopy(modules[0]).to("meta")  # the structure functional_call runs
        self.params = {name: self._stack(name, "_parameters") for name, _ in modules[0].named_parameters()}
        self.buffers = {name: self._stack(name, "_buffers") for name, _ in modules[0].named_buffers()}

    def __len__(self) -> int:
        return len(self.modules)

    def _stack(self, name: str, kind: str) -> torch.Tensor:
        parent_name, _, leaf = name.rpartition(".")
        owners = [m.get_submodule(parent_name) for m in self.modules]
        tensors = [getattr(owner, kind)[leaf] for owner in owners]
        rows = [t.shape[0] if t.dim() else 0 for t in tensors]
        stacked = tensors[0].new_zeros((len(tensors), max(rows), *tensors[0].shape[1:]) if rows[0] else (len(tensors),))
        for i, (owner, old) in enumerate(zip(owners, tensors, strict=True)):
            view = stacked[i, : rows[i]] if rows[i] else stacked[i]
            view.copy_(old.detach())
            if kind == "_parameters":
                view = nn.Parameter(view, requires_grad=old.requires_grad)  # shares the stacked storage
            getattr(owner, kind)[leaf] = view
        if kind == "_parameters":
            stacked.requires_grad_(tensors[0].requires_grad)
        return stacked

    def forward_each(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], *inputs: torch.Tensor):
        """Inside a vmapped function: run i's forward with its slice of the stacked tensors."""
        return functional_call(self.base, {**params, **buffers}, inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """inputs (N, B, ...) -> each run's output on its own slice, stacked (N, B, ...)."""
        return vmap(self.forward_each)(self.params, self.buffers, *inputs)

    def scatter_grads(self) -> None:
        """Hand each run's slice of the stacked gradients to its own parameters (views, no copy),
        and clear the stacked ones for the next backward."""
        for name, stacked in self.params.items():
            if stacked.grad is None:
                continue
            for i, module in enumerate(self.modules):
                parameter = module.get_parameter(name)
                parameter.grad = stacked.grad[i, : parameter.shape[0]] if parameter.dim() else stacked.grad[i]
            stacked.grad = None


def explore(rng: np.random.Generator, epsilon: float, num_actions: int) -> int | None:
    """With probability epsilon a random action, else None (the greedy one is wanted): the draws a
    single run's loop makes from its acting stream, in the same order."""
    return int(rng.integers(num_actions)) if rng.random() < epsilon else None


def epsilon_greedy_runs(
    runs: Sequence[Any],
    stacks: dict[Any, StackedModules],
    groups: dict[Any, list[int]],
    obs: Sequence[Any],
    epsilon: float,
    inputs: dict[Any, torch.Tensor] | None = None,
) -> list[int]:
    """Each run's epsilon-greedy action, drawn from its own acting stream (run.rng) as it is
    alone; the greedy actions of all runs that need one come from one batched forward per stack
    (`groups` maps a stack's key to the indices of its runs; `inputs` to a per-run second input of
    its forward, e.g. DrQ's action masks), and from one host sync for all."""
    actions = [explore(run.rng, epsilon, run.env.action_space.n) for run in runs]
    asking = {key: members for key, members in groups.items() if any(actions[i] is None for i in members)}
    if not asking:
        return actions  # type: ignore[return-value]
    greedy = []
    for key, members in asking.items():  # every stack's forward queued before the one sync
        batch = torch.as_tensor(np.stack([obs[i] for i in members])[:, None], device=runs[members[0]].device)
        with torch.no_grad():
            extra = [inputs[key]] if inputs and key in inputs else []
            greedy.append(stacks[key](batch, *extra).argmax(-1)[:, 0])
    for i, action in zip([i for members in asking.values() for i in members], torch.cat(greedy).tolist(), strict=True):
        actions[i] = action if actions[i] is None else actions[i]
    return actions  # type: ignore[return-value]


# What each run of a batch may choose on its own; everything else is one configuration for all.
PER_RUN = frozenset({"env_id", "seed", "output_dir"})


def update_mode_of(args: Any) -> str:
    """The update of several runs in one process: --batched-update vmap or concurrent; auto is
    concurrent on a CPU (2.2x vmap's run-updates/s for 8 runs on this project's 2 cores: vmap's
    grouped convolutions are slower than plain ones there) and vmap on CUDA (the one measured)."""
    mode = getattr(args, "batched_update", "vmap")
    if mode == "auto":
        on_cuda = args.run.device == "cuda" or (args.run.device == "auto" and torch.cuda.is_available())
        return "vmap" if on_cuda else "concurrent"
    return mode


def batch_problems(all_args: Sequence[Any]) -> list[str]:
    """Why these runs cannot share a process: they differ in more than game, seed and folder, a
    (game, seed) repeats, or a refused method is chosen: lifecycle layers (they replace the
    network's layers after the runs' parameters are stacked) and, under a vmapped update, the
    methods that hook one network's forward or optimizer (a concurrent update runs each run's own).
    Then whether every run's replay (0.7 GB each at --buffer-size 100000) fits in the device's
    free memory at once."""
    refused = ("lifecycle",) if update_mode_of(all_args[0]) == "concurrent" else ("cbp", "noise", "lifecycle")
    configs = [flat_config(args) for args in all_args]
    problems = [f"--{key.replace('_', '-')}: runs in one process share one configuration, not {values}"
                for key in configs[0] if key not in PER_RUN
                for values in [sorted({str(c[key]) for c in configs})] if len(values) > 1]  # fmt: skip
    pairs = [(_game_or_spelling(c["env_id"]), c["seed"]) for c in configs]  # Pong and ALE/Pong-v5 are one game
    if len(set(pairs)) < len(pairs):
        problems.append(f"--env-id / --seed: a (game, seed) repeats in {pairs}")
    chosen = [m for m in getattr(all_args[0].interventions, "continual", ()) if m in refused]
    if chosen:
        problems.append(f"--continual {' '.join(chosen)}: not in these batched runs (cbp and noise hook one network's "
                        "forward or optimizer: --batched-update concurrent runs them; lifecycle layers replace the "
                        "stacked layers); run these one (game, seed) at a time")  # fmt: skip
    args = all_args[0]
    return problems or FrameReplay.memory_problems(args.buffer_size, args.run.device, runs=len(all_args))


def _game_or_spelling(env_id: str) -> str:
    try:
        return canonical_game(env_id)
    except ValueError:  # an unknown game: refused by the run's own validation
        return env_id


def group_by(keys: Sequence[Any]) -> dict[Any, list[int]]:
    """key -> the indices that have it, in order (runs whose networks can share one stack)."""
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def check_lockstep(runs: Sequence[Any]) -> None:
    """Runs in one process step together: an interrupted batch resumes only if all its runs'
    checkpoints are at one step."""
    starts = sorted({run.start_step - 1 for run in runs})
    if len(starts) > 1:
        sys.exit(f"{runs[0].agent}: runs in one process resume together, but their checkpoints are at steps {starts}; "
                 "resume them one at a time or start the late ones over")  # fmt: skip
