"""DrQ(epsilon) on Atari-100k, in one file: the arguments, the network, the loss, then the loop.

Agarwal et al. 2021, "Deep RL at the Edge of the Statistical Precipice" (DrQ(epsilon)), after
Kostrikov et al. 2020 (DrQ); hyperparameters of dopamine's labs/atari_100k DrQ_eps.gin.

    python agents/drq.py --env-id Breakout
    python agents/drq.py drq-eps --env-id Qbert          # with the 2021 runner's noop starts (frames)
    python agents/drq.py hare-tortoise --env-id Pong     # Lee et al. 2024, section 5: RR2, EMA 0.995, HT resets
    python agents/drq.py --env-id Pong Boxing --seed 1 2 3   # 6 runs in one process: agents/drq_batched.py

The network is dopamine's: Nature CNN with 'SAME' padding, ONE shared Dense(512)+ReLU, then a
dueling output Dense(A) + Dense(1). The environment protocol (rlplastic.envs.atari) is dopamine's
Atari-100k runner's: noop starts outside the episode's counters, a frame skip that stops at a life
loss, a 27k-step episode cap.

Differences from the reference, on purpose:
- without --ema the target comes from the online network itself (the reference copies the online
  network into the target every step, which is the same function), computed under no_grad;
- the update is queued before the environment steps (dopamine trains just before choosing the
  action): the action comes from parameters one update older, so a GPU overlaps the two;
- without a preset the noop starts are 0..29 agent steps, as in dopamine's Atari-100k runner since
  2023 (BBF's); its 2021 runner, the one DrQ_eps.gin configured when it was added (2021-09-08) and
  so presumably the one behind Agarwal et al. 2021's released runs, played 0..29 single frames: the
  `drq-eps` preset sets --noop-unit frames to compare with those runs;
- the 27k-step episode cap is in agent steps as the papers give it; dopamine's newer gymnasium
  path also asks ALE for at most 100,000 frames (25k steps, noop frames included).

Interventions (--reset hare-tortoise, head, shrink-perturb, redo; --continual cbp, noise, lifecycle;
rlplastic.interventions) are built from the flags and stepped after each optimizer step; the run
folder, logs, checkpoints and evaluation are rlplastic.runs.Run's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from rlplastic.envs.atari import clip_reward

from rlplastic.augment import drq_augment
from rlplastic.cli import cli_with_presets, expand_runs
from rlplastic.cuda_graphs import CapturedStep, graph_capture_available
from rlplastic.diagnostics import PlasticityProbe
from rlplastic.init import xavier_uniform_zero_bias
from rlplastic.interventions import InterventionOptions, build_interventions, ema_target, swap_in_chosen_lifecycle
from rlplastic.replay import FrameReplay
from rlplastic.runs import Run, RunOptions, interruptible, run_problems
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
    """on CUDA, capture the whole update (sampling, augmentation, loss, backward, Adam, the interventions'
    per-step work) once in a CUDA graph and replay it; ignored on the CPU"""
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


def td_loss(online: Callable, target: Callable, states: torch.Tensor, next_states: torch.Tensor, actions: torch.Tensor,
            returns: torch.Tensor, discounts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """DrQ(epsilon)'s loss: Huber (delta 1) between Q(s, a) and the n-step double-DQN target, whose
    bootstrap comes from `target` (no gradient). `online` and `target` map states to Q-values; the
    same function without --ema. Returns the loss and the mean Q(s, a) (detached)."""
    with torch.no_grad():
        next_q_online = online(next_states)
        next_q_target = next_q_online if target is online else target(next_states)
        targets = double_dqn_target(returns, discounts, next_q_online, next_q_target)
    q = online(states).gather(1, actions[:, None]).squeeze(1)
    return F.smooth_l1_loss(q, targets), q.detach().mean()


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
    """One gradient step on a replay batch; returns the TD loss and mean Q as device tensors (no host sync)."""
    batch = replay.sample(args.batch_size)
    states, next_states = batch.states, batch.next_states
    if args.augment:  # each independently, as in the reference
        states = drq_augment(states, generator)
        next_states = drq_augment(next_states, generator)
    loss, q_mean = td_loss(q_network, target_network, states, next_states, batch.actions, batch.returns,
                           batch.discounts)  # fmt: skip
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"td_loss": loss.detach(), "q_values": q_mean}


def main(args: Args) -> dict:
    """One run, from its start (or its checkpoint) to its results.json; returns the results."""
    run = Run("drq", args, validate(args), method_label(args), __file__)  # exits on bad arguments, before any work
    env = run.make_env()  # the Atari-100k protocol, seeded; kept in checkpoints
    num_actions = int(env.action_space.n)
    q_network, target_network, optimizer = build_learner(args, num_actions, run.device)
    replay = FrameReplay(args.buffer_size, args.n_step, args.gamma, device=run.device, generator=run.generator)
    sample_states = lambda n: replay.sample(n).states  # noqa: E731
    ema = None if target_network is q_network else target_network  # the EMA target, with --ema
    interventions = build_interventions(args.interventions, q_network, ema, optimizer, sample_states,
                                        xavier_uniform_zero_bias, HEAD_MODULES)  # fmt: skip
    probe = PlasticityProbe(q_network, probe_batch=None)  # the initial weights; its batch comes from replay
    run.keep(q_network=q_network, optimizer=optimizer, interventions=interventions, replay=replay, probe=probe,
             target_network=ema)  # fmt: skip
    saved = run.resume()
    obs = saved["obs"] if saved else env.reset()[0]
    act = greedy(q_network)

    def train_step() -> None:  # the update and the interventions' device work: what a CUDA graph captures
        run.losses.add(update(args, q_network, target_network, optimizer, replay, run.generator))
        interventions.device_step()

    use_graph = args.cuda_graph and graph_capture_available(run.device) and interventions.graph_safe
    if use_graph:  # sampling and augmentation draw from run.generator inside the graph
        train_step = CapturedStep(train_step, generators=[run.generator])
    update_mode = "cuda-graph" if use_graph else "eager"
    explore = LinearEpsilon(args.learning_starts, args.epsilon_decay_steps, args.epsilon_final)  # dopamine's

    # TRAINING LOOP
    for step in run.steps():
        # ALGO LOGIC: epsilon-greedy, from the run's acting stream
        epsilon = explore(step - 1)  # step - 1 agent steps taken so far
        if run.rng.random() < epsilon:
            action = int(run.rng.integers(num_actions))
        else:
            action = int(act(obs[None])[0])  # the loop's one host sync

        # Queued before the env steps, so a GPU runs it while the CPU steps the emulator (dopamine
        # trains just before acting: acting on parameters one update older is the only difference).
        if step >= args.learning_starts and replay.num_sampleable > 0:
            for _ in range(args.updates_per_step):
                train_step()
                interventions.host_step()  # schedules and rare events (resets, recycling) after optimizer.step
                run.losses.tick()

        next_obs, reward, terminated, truncated, info = env.step(action)
        # a life loss is a terminal for learning, yet the game goes on (dopamine's terminal_on_life_loss)
        replay.add(obs[-1], action, clip_reward(reward), terminated or info["life_loss"], truncated)
        if terminated or truncated:
            run.episode(step, info)  # tensorboard charts/episodic_return, results.json train_episodes
            next_obs, _ = env.reset()
        obs = next_obs

        if run.report_due(step):
            run.report(step, {"epsilon": epsilon}, interventions.metrics())  # progress line, losses, activity
        run.diagnose(step, probe, sample_states, replay.num_sampleable > 0)  # dormant units, ranks, ...
        run.evaluate_if_due(step, act, [q_network])
        run.checkpoint(step, obs=obs)

    return run.finish(act, [q_network], {"update_mode": update_mode}, models={"q_network": q_network})


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    commands = expand_runs(sys.argv[1:])  # --env-id A B --seed 1 2 3: several runs
    with interruptible("drq"):  # Ctrl-C / SIGTERM: one line per run, the checkpoint kept
        if len(commands) > 1:  # in one process, in lockstep: the batched machinery beside this file
            from drq_batched import train_many

            train_many(commands)
        else:
            main(cli_with_presets(Args, PRESETS, __doc__, commands[0]))
