"""DrQ(epsilon) on Atari-100k, in one file.

Agarwal et al. 2021, "Deep RL at the Edge of the Statistical Precipice" (DrQ(epsilon)), after
Kostrikov et al. 2020 (DrQ); hyperparameters of dopamine's labs/atari_100k DrQ_eps.gin.

    python agents/drq.py --env-id Breakout
    python agents/drq.py --env-id Pong Boxing --seed 1 2 3 --env-workers 4   # 6 runs in one process (train)

The network is dopamine's: Nature CNN with 'SAME' padding, ONE shared Dense(512)+ReLU, then a
dueling output Dense(A) + Dense(1) (4,045,989 parameters with 4 actions). The environment protocol
(rlplastic.envs.atari) is dopamine's Atari-100k runner's: noop starts outside the episode's
counters, a frame skip that stops at a life loss.

The Hare & Tortoise RL setting (Lee et al. 2024, section 5 and Table 1: replay ratio 2, EMA target
with momentum 0.995, hare <- tortoise every 4,000 gradient steps; the online network acts, as in
dopamine's DrQ):

    python agents/drq.py hare-tortoise --env-id Pong     # = --updates-per-step 2 --ema 0.995 --reset hare-tortoise
    python agents/drq.py hare-tortoise --env-id Pong --reset hare-tortoise head --head-every 40000

Differences from the reference, on purpose:
- without --ema the target comes from the online network itself (the reference copies the online
  network into the target every step, which is the same function), computed under no_grad;
- with --ema the momentum target is updated by rlplastic's HareTortoise (the tortoise), which
  copies itself into the online network only when --reset hare-tortoise is on;
- the update is queued before the environment steps (dopamine trains just before choosing the
  action): the action comes from parameters one update older, so a GPU overlaps the two;
- without a preset the noop starts are 0..29 agent steps, as in dopamine's Atari-100k runner since
  2023 (BBF's); its 2021 runner, the one DrQ_eps.gin configured when it was added (2021-09-08) and
  so presumably the one behind Agarwal et al. 2021's released DrQ(epsilon) runs, played 0..29 single
  frames instead: the `drq-eps` preset sets --noop-unit frames to compare with those runs;
- the 27k-step episode cap is in agent steps as the papers give it; dopamine's newer gymnasium
  path also asks ALE for at most 100,000 frames (25k steps, noop frames included), which would end
  a few very long evaluation episodes earlier.

Interventions (rlplastic.interventions.InterventionOptions): --reset hare-tortoise (with --ema), head, shrink-perturb,
redo; --continual cbp, noise, lifecycle. Run folder, logs, checkpoints, evaluation: rlplastic.runs.Run (RunOptions).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from rlplastic.envs.atari import canonical_game
from torch.func import vmap

from rlplastic import batched
from rlplastic.augment import drq_augment, drq_augment_runs
from rlplastic.cli import cli_with_presets, expand_runs
from rlplastic.cuda_graphs import CapturedStep, ConcurrentSteps, graph_capture_available
from rlplastic.diagnostics import PlasticityProbe
from rlplastic.env_workers import EnvWorkers
from rlplastic.init import xavier_uniform_zero_bias
from rlplastic.interventions import InterventionOptions, build_interventions, ema_target, swap_in_chosen_lifecycle
from rlplastic.replay import FrameReplay, StackedFrameReplays
from rlplastic.runs import Run, RunOptions, exit_on_problems, final_evaluations, interruptible, run_problems
from rlplastic.schedules import LinearEpsilon

FLAT = tyro.conf.arg(name="")  # a nested dataclass whose flags stay flat: --reset, not --interventions.reset


@dataclass
class Args:
    env_id: str = "Breakout"
    """Atari-100k game: a name such as Pong or MsPacman, or an ALE id such as ALE/Pong-v5"""
    seed: int = 1
    """seed of the environment, the network, replay sampling and augmentation"""
    total_steps: int = 100_000
    """agent steps of interaction (100k = 400k frames, the Atari-100k budget)"""
    cuda_graph: bool = True
    """on CUDA, capture the whole update (sampling, augmentation, loss, backward, Adam, the
    interventions' per-step work; all runs' batched update with several runs) once in a CUDA graph
    and replay it; ignored on the CPU"""
    batched_update: Literal["auto", "vmap", "concurrent"] = "auto"
    """several runs: one vmapped update per stack, or each run's own (on CUDA captured and replayed
    side by side on streams; on a CPU one after another, as alone); auto: concurrent on a CPU, vmap on CUDA"""

    # Algorithm: dopamine DrQ_eps.gin
    learning_starts: int = 1_600
    """agent steps of random play before the first update (also the epsilon warm-up)"""
    buffer_size: int = 100_000
    """replay capacity in agent steps"""
    batch_size: int = 32
    """transitions per update"""
    n_step: int = 10
    """n of the n-step return"""
    gamma: float = 0.99
    """discount factor"""
    learning_rate: float = 1e-4
    """Adam learning rate"""
    adam_eps: float = 1.5e-4
    """Adam epsilon"""
    updates_per_step: int = 1
    """gradient updates per agent step once learning has started (the replay ratio)"""
    epsilon_final: float = 0.01
    """exploration rate at the end of the decay"""
    epsilon_decay_steps: int = 5_000
    """agent steps, after learning_starts, over which epsilon falls linearly from 1 to epsilon_final"""
    augment: bool = True
    """random shift (pad 4) and intensity augmentation of states and next states"""

    # Without --ema the target is the online network itself (the reference copies it every step).
    interventions: Annotated[InterventionOptions, FLAT] = field(default_factory=InterventionOptions)
    run: Annotated[RunOptions, FLAT] = field(default_factory=RunOptions)


PRESETS = {
    # the agent of Agarwal et al. 2021's released runs, under the runner DrQ_eps.gin configured when it was
    # added (2021-09-08): dopamine's 2021 labs/atari_100k runner, whose noop starts were single frames
    "drq-eps": ("DrQ(epsilon) as dopamine's DrQ_eps.gin with its 2021 runner's noop starts (frames)",
                Args(run=RunOptions(noop_unit="frames"))),
    "hare-tortoise": ("Hare & Tortoise's DrQ (Lee et al. 2024, Table 1): replay ratio 2, EMA target 0.995, "
                      "hare <- tortoise every 4,000 gradient steps",
                      Args(updates_per_step=2, interventions=InterventionOptions(reset=("hare-tortoise",), ema=0.995))),
    "cpu-smoke": ("a few minutes on a CPU: 3,000 steps, a 10-episode evaluation",
                  Args(env_id="Pong", total_steps=3_000, run=RunOptions(eval_episodes=10, device="cpu"))),
}  # fmt: skip


def validate(args: Args) -> list[str]:
    """Every problem with the arguments, each naming the value and what is allowed."""
    problems = run_problems(args)  # --env-id, --total-steps and the run's options
    for name, low, allowed in (("n_step", 1, "a positive integer"), ("updates_per_step", 1, "a positive integer"),
                               ("learning_starts", 0, ">= 0"), ("epsilon_decay_steps", 0, ">= 0")):  # fmt: skip
        if getattr(args, name) < low:
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {allowed}")
    if args.learning_starts > args.total_steps:
        problems.append(f"--learning-starts {args.learning_starts}: must be <= --total-steps {args.total_steps}")
    if not 0.0 <= args.epsilon_final <= 1.0:
        problems.append(f"--epsilon-final {args.epsilon_final}: must lie in [0, 1]")
    if not 0.0 < args.gamma <= 1.0:
        problems.append(f"--gamma {args.gamma}: must lie in (0, 1]")
    if not args.learning_rate > 0 or not args.adam_eps > 0:
        problems.append(f"--learning-rate {args.learning_rate} / --adam-eps {args.adam_eps}: must be > 0")
    problems += FrameReplay.problems(args.buffer_size, args.batch_size, max(args.n_step, 0), args.run.device)
    return problems + args.interventions.problems("drq")


# The arguments the default method label shows; a sweep adds key=value for any other it varies.
LABELLED_ARGS = {"reset", "continual", "exp_name"}


def method_label(args: Args) -> str:
    """The name reports group runs by: --exp-name, or drq plus the chosen interventions."""
    return args.run.exp_name or "+".join(["drq", *args.interventions.chosen])


# NETWORK
class SamePadConv(nn.Sequential):
    """Conv2d with TensorFlow 'SAME' padding (extra pixel right/bottom), as in the reference."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, in_size: int):
        out_size = -(-in_size // stride)
        total = max((out_size - 1) * stride + kernel - in_size, 0)
        pad = (total // 2, total - total // 2)
        super().__init__(nn.ZeroPad2d((*pad, *pad)), nn.Conv2d(in_channels, out_channels, kernel, stride))
        self.out_size = out_size


class QNetwork(nn.Module):
    """Nature CNN encoder (SAME padding, 11x11x64 = 7,744 features), one shared Dense(512)+ReLU,
    then a dueling output: Dense(A) advantages and Dense(1) value (dopamine's FullRainbowNetwork
    with dueling on and one atom; 4,045,989 parameters with 4 actions).

    `head` (the shared hidden layer) plus `advantage` and `value` form the "head" that head resets
    re-initialize (Nikishin et al. 2022; Lee et al. 2024 section 5: the MLP after the encoder)."""

    def __init__(self, num_actions: int, in_channels: int = 4, hidden: int = 512):
        super().__init__()
        c1 = SamePadConv(in_channels, 32, 8, 4, 84)
        c2 = SamePadConv(32, 64, 4, 2, c1.out_size)
        c3 = SamePadConv(64, 64, 3, 1, c2.out_size)
        self.encoder = nn.Sequential(c1, nn.ReLU(), c2, nn.ReLU(), c3, nn.ReLU(), nn.Flatten())
        features = 64 * c3.out_size**2
        self.head = nn.Sequential(nn.Linear(features, hidden), nn.ReLU())
        self.advantage = nn.Linear(hidden, num_actions)
        self.value = nn.Linear(hidden, 1)
        self.apply(xavier_uniform_zero_bias)  # the reference's init

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        h = self.head(self.encoder(x / 255.0))
        advantage = self.advantage(h)
        if valid is None:
            return self.value(h) + advantage - advantage.mean(1, keepdim=True)
        # a run in a stack of games with more actions (its head padded; `valid` its real actions):
        # padded actions count in no mean and are never chosen
        mean = (advantage * valid).sum(1, keepdim=True) / valid.sum()
        return (self.value(h) + advantage - mean).masked_fill(~valid, float("-inf"))


HEAD_MODULES = ("head", "advantage", "value")  # what --reset head re-initializes


def action_mask(stack: batched.StackedModules) -> torch.Tensor:
    """(N, most actions): True where run i of the stack has that action."""
    actions = torch.tensor([q.advantage.out_features for q in stack.modules], device=stack.params["value.bias"].device)
    return torch.arange(int(actions.max()), device=actions.device) < actions[:, None]


def sample_states(replay: FrameReplay) -> Callable[[int], torch.Tensor]:
    return lambda n: replay.sample(n).states


def greedy(q_network: QNetwork) -> Callable[[np.ndarray], np.ndarray]:
    """The greedy policy of `q_network`: a batch of observations -> their greedy actions."""
    device = next(q_network.parameters()).device

    def act(observations: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return q_network(torch.as_tensor(observations, device=device)).argmax(1).cpu().numpy()

    return act


# ALGO LOGIC
def double_dqn_target(
    returns: torch.Tensor, discounts: torch.Tensor, next_q_online: torch.Tensor, next_q_target: torch.Tensor
) -> torch.Tensor:
    """R^(n) + gamma^n * Q_target(s', argmax_a Q_online(s', a)); discounts is 0 past a terminal."""
    best = next_q_online.argmax(1, keepdim=True)
    return returns + discounts * next_q_target.gather(1, best).squeeze(1)


def build_learner(args: Args, num_actions: int, device: torch.device, q_network: QNetwork | None = None):
    """The online network (`q_network` if given), the target network (the online one itself without
    --ema), the optimizer (capturable on CUDA when the update may be graph-captured)."""
    q_network = q_network or QNetwork(num_actions).to(device)
    # fused: one kernel for all tensors, 6x faster than the default loop on a 2-core CPU too
    capturable = args.cuda_graph and device.type == "cuda"
    optimizer = torch.optim.Adam(
        q_network.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True, capturable=capturable
    )
    swap_in_chosen_lifecycle(args.interventions, q_network, optimizer)
    target_network = ema_target(q_network) if args.interventions.ema > 0 else q_network
    return q_network, target_network, optimizer


def update(
    args: Args,
    q_network: QNetwork,
    target_network: QNetwork,
    optimizer: torch.optim.Optimizer,
    replay: FrameReplay,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """One gradient step; returns the TD loss and mean Q as device tensors (no host sync)."""
    batch = replay.sample(args.batch_size)
    states, next_states = batch.states, batch.next_states
    if args.augment:  # each independently, as in the reference
        states = drq_augment(states, generator)
        next_states = drq_augment(next_states, generator)
    with torch.no_grad():
        next_q_online = q_network(next_states)
        next_q_target = next_q_online if target_network is q_network else target_network(next_states)
        targets = double_dqn_target(batch.returns, batch.discounts, next_q_online, next_q_target)
    q = q_network(states).gather(1, batch.actions[:, None]).squeeze(1)
    loss = F.smooth_l1_loss(q, targets)  # Huber, delta 1
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"td_loss": loss.detach(), "q_values": q.detach().mean()}


def batched_update(
    args: Args,
    online: batched.StackedModules,
    target: batched.StackedModules | None,
    optimizers: list[torch.optim.Optimizer],
    replays: StackedFrameReplays,
    generators: list[torch.Generator],
    valid: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """update() for the runs of one stack at once: each run's sampling and augmentation draws are its
    own, as alone, their gathers one call for all; one vmapped forward and backward; each run's
    optimizer steps its own parameters (valid: action_mask(online)). Returns TD losses and mean Q of
    the runs, (N,) on the device."""
    batch = replays.sample(args.batch_size)  # (N, B, ...)
    states, next_states = batch.states, batch.next_states
    if args.augment:
        states, next_states = drq_augment_runs(states, generators), drq_augment_runs(next_states, generators)
    stacked_batch = [valid, states, next_states, batch.actions, batch.returns, batch.discounts]
    target = target or online

    def run_loss(params, buffers, target_params, target_buffers, valid, states, next_states, actions, returns,
                 discounts):  # fmt: skip
        with torch.no_grad():
            next_q_online = online.forward_each(params, buffers, next_states, valid)
            next_q_target = target.forward_each(target_params, target_buffers, next_states, valid)
            targets = double_dqn_target(returns, discounts, next_q_online, next_q_target)
        q = online.forward_each(params, buffers, states, valid).gather(1, actions[:, None]).squeeze(1)
        return F.smooth_l1_loss(q, targets), q.detach().mean()

    loss, q_mean = vmap(run_loss)(online.params, online.buffers, target.params, target.buffers, *stacked_batch)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.sum().backward()  # each run's gradient is its own loss's
    online.scatter_grads()
    for optimizer in optimizers:
        optimizer.step()
    return {"td_loss": loss.detach(), "q_values": q_mean}


def main(args: Args) -> dict:
    """One run: its results (also written to its run folder)."""
    return train([args])[0]


def train(all_args: list[Args]) -> list[dict]:
    """One run, or several (game, seed) runs of one configuration in one process, in lockstep: each
    with its own network, optimizer, replay, interventions, environment, random streams and run
    folder; runs with one number of actions share batched forwards (rlplastic.batched)."""
    many, args = len(all_args) > 1, all_args[0]
    problems = [f"{a.env_id} seed {a.seed}: {p}" if many else p for a in all_args for p in validate(a)]
    problems += batched.batch_problems(all_args) if many else []
    exit_on_problems("drq", problems)
    runs, nets = [], []
    games = [(canonical_game(a.env_id), a.seed) for a in all_args]
    protocol = (args.run.max_episode_steps, args.run.noop_unit)  # the same for all runs (batch_problems)
    workers = EnvWorkers(games, args.run.env_workers, *protocol) if many and args.run.env_workers else None
    for i, run_args in enumerate(all_args):  # each run seeds, then draws its network, as alone
        runs.append(Run("drq", run_args, [], method_label(run_args), __file__))  # folder, logs, checkpoints
        env = runs[-1].use_env(workers.env(i)) if workers else runs[-1].make_env()
        nets.append(QNetwork(int(env.action_space.n)).to(runs[-1].device))
        if many:
            runs[-1].own_global_rng()  # its later fresh draws come from its own copy of torch's generators
    batched.check_lockstep(runs)
    vmapped = many and batched.update_mode_of(args) == "vmap"  # else each run's own update, no target stacks
    # vmapped: one stack of all runs, heads padded to the most actions; else a stack per number of
    # actions, for acting only (unmasked: each run's numbers exactly as alone)
    groups = batched.group_by(keys := [0 if vmapped else q.advantage.out_features for q in nets])
    stacks = {n: batched.StackedModules([nets[i] for i in members]) for n, members in groups.items()} if many else {}
    masks = {n: action_mask(stack) for n, stack in stacks.items()} if vmapped else {}
    learners = [build_learner(a, 0, run.device, q) for a, run, q in zip(all_args, runs, nets, strict=True)]
    target_stacks = {n: batched.StackedModules([learners[i][1] for i in members]) if args.interventions.ema > 0
                     else None for n, members in groups.items()} if vmapped else {}  # fmt: skip
    # each stack's replays in stacked tensors, sampled in one call by the batched update; run i's: views
    stacked_replays = {n: StackedFrameReplays(len(members), args.buffer_size, args.n_step, args.gamma,
                                              device=runs[0].device, generators=[runs[i].generator for i in members])
                       for n, members in groups.items()}  # fmt: skip
    replays = [stacked_replays[n][groups[n].index(i)] for i, n in enumerate(keys)]
    interventions, probes, obs = [], [], []
    for run, replay, (q, target, optimizer) in zip(runs, replays, learners, strict=True):
        target = None if target is q else target  # the EMA target, when there is one
        with run.global_rng():
            items = build_interventions(args.interventions, q, target, optimizer, sample_states(replay),
                                        xavier_uniform_zero_bias, HEAD_MODULES)  # fmt: skip
        interventions.append(items)
        probes.append(PlasticityProbe(q, probe_batch=None))  # the initial weights; its batch comes from replay
        run.keep(q_network=q, optimizer=optimizer, interventions=items, replay=replay, probe=probes[-1],
                 target_network=target)  # fmt: skip
        saved = run.resume()
        obs.append(saved["obs"] if saved else run.env.reset()[0])

    def train_step(i: int = 0) -> None:  # run i's update, its interventions' device work: what a graph captures
        runs[i].losses.add(update(args, *learners[i], replays[i], runs[i].generator))
        interventions[i].device_step()

    def batched_step() -> None:
        for n, members in groups.items():
            losses = batched_update(args, stacks[n], target_stacks[n], [learners[i][2] for i in members],
                                    stacked_replays[n], [runs[i].generator for i in members], masks[n])  # fmt: skip
            for j, i in enumerate(members):
                interventions[i].device_step()
                runs[i].losses.add({key: value[j] for key, value in losses.items()})

    use_graph = args.cuda_graph and graph_capture_available(runs[0].device) and all(i.graph_safe for i in interventions)
    concurrent = many and not vmapped
    step_all = batched_step if many else train_step
    if concurrent:  # each run's own update; on CUDA one graph each, replayed side by side
        step_all = ConcurrentSteps([partial(train_step, i) for i in range(len(runs))], [r.generator for r in runs],
                                   use_graph)  # fmt: skip
    elif use_graph:  # every run's sampling and augmentation stream is registered with the one graph
        step_all = CapturedStep(step_all, generators=[run.generator for run in runs])
    update_mode = "-".join(["batched"] * many + ["concurrent"] * concurrent + ["cuda-graph"] * use_graph) or "eager"
    print(f"drq: update {update_mode}, {len(runs)} run(s)", flush=True)

    acts, samplers = [greedy(q) for q in nets], [sample_states(replay) for replay in replays]

    # TRAINING LOOP
    explore = LinearEpsilon(args.learning_starts, args.epsilon_decay_steps, args.epsilon_final)  # dopamine's
    for step in [run.steps() for run in runs][0]:  # every run's clock starts; they step together
        epsilon = explore(step - 1)  # step - 1 agent steps taken so far
        if many:  # one batched forward per stack for the greedy actions; a diverged run's env stays still
            actions = batched.epsilon_greedy_runs(runs, stacks, groups, obs, epsilon, masks)
            actions = [None if run.diverged else action for run, action in zip(runs, actions, strict=True)]
        else:
            actions = [runs[0].epsilon_greedy(epsilon, obs[0], acts[0])]

        # Queued before the env steps, so a GPU runs it while the CPU steps the emulator (dopamine
        # trains just before acting: acting on parameters one update older is the only difference).
        if step >= args.learning_starts and all(replay.num_sampleable > 0 for replay in replays):
            for _ in range(args.updates_per_step):
                step_all()  # the update(s) and the interventions' device work: one graph replay on CUDA
                for run, run_interventions in zip(runs, interventions, strict=True):
                    if not run.diverged:  # a diverged run's updates go on in the batch, unread
                        with run.global_rng():
                            run_interventions.host_step()  # schedules and rare events (resets, recycling)
                    run.losses.tick()

        stepped = workers.step_all(actions) if workers else [None] * len(runs)  # all at once, in the workers
        for i, run in enumerate(runs):  # a life loss is a terminal in replay, as in dopamine
            if run.diverged:  # set aside (Run.finite): the other runs go on
                continue
            obs[i] = run.env_step(replays[i], obs[i], actions[i], step, stepped[i])
            if run.report_due(step):
                run.report(step, {"epsilon": epsilon}, interventions[i].metrics())
            run.diagnose(step, probes[i], samplers[i], replays[i].num_sampleable > 0)
            run.evaluate_if_due(step, acts[i], [nets[i]])
            run.checkpoint(step, obs=obs[i])
    done = [i for i, run in enumerate(runs) if not run.diverged]  # a diverged run is set aside (Run.finite)
    # several runs: their final evaluations on all cores at once
    evaluations = final_evaluations([runs[i] for i in done], [acts[i] for i in done], [nets[i] for i in done],
                                    args.run.env_workers) if done else []  # fmt: skip
    results = [runs[i].finish(acts[i], [nets[i]], {"update_mode": update_mode}, models={"q_network": nets[i]},
                              evaluation=evaluation)
               for i, evaluation in zip(done, evaluations, strict=True)]  # fmt: skip
    diverged = [run for run in runs if run.diverged]
    for run in diverged:
        run.set_aside()
    if diverged:
        names = "; ".join(f"{run.game} seed {run.seed} diverged ({run.folder / 'diverged.json'})" for run in diverged)
        sys.exit(f"drq: {names}; {len(results)} other run(s) finished")
    return results


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    commands = expand_runs(sys.argv[1:])  # --env-id A B --seed 1 2 3: one process, several runs
    all_args = [cli_with_presets(Args, PRESETS, __doc__, command) for command in commands]
    with interruptible("drq"):  # Ctrl-C / SIGTERM: one line per run, the checkpoint kept
        train(all_args)
