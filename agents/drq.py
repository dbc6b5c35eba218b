"""DrQ(epsilon) on Atari-100k, in one file.

Agarwal et al. 2021, "Deep RL at the Edge of the Statistical Precipice" (DrQ(epsilon)), after
Kostrikov et al. 2020 (DrQ); hyperparameters of dopamine's labs/atari_100k DrQ_eps.gin.

    python agents/drq.py --env-id Breakout
    python agents/drq.py --env-id Pong --seed 2 --total-steps 100000 --device cuda

The network is dopamine's: Nature CNN with 'SAME' padding, ONE shared Dense(512)+ReLU, then a
dueling output Dense(A) + Dense(1) (4,045,989 parameters with 4 actions). The environment protocol
(rlplastic.envs.atari) is dopamine's Atari-100k runner's: noop starts outside the episode's
counters, a frame skip that stops at a life loss.

The Hare & Tortoise RL setting (Lee et al. 2024, section 5 and Table 1: replay ratio 2, EMA target
with momentum 0.995, hare <- tortoise every 4,000 gradient steps; the online network acts, as in
dopamine's DrQ):

    python agents/drq.py hare-tortoise --env-id Pong     # = --updates-per-step 2 --ema 0.995 --reset hare-tortoise
    python agents/drq.py --env-id Pong --updates-per-step 2 --reset head --head-every 20000
    python agents/drq.py hare-tortoise --env-id Pong --reset hare-tortoise head --head-every 40000

Differences from the reference, on purpose:
- without --ema the target comes from the online network itself (the reference copies the online
  network into the target every step, which is the same function), computed under no_grad;
- with --ema the momentum target is updated by rlplastic's HareTortoise (the tortoise), which
  copies itself into the online network only when --reset hare-tortoise is on;
- the update is queued before the environment steps (dopamine trains just before choosing the
  action): the action comes from parameters one update older, so a GPU overlaps the two;
- the 27k-step episode cap is in agent steps as the papers give it; dopamine's newer gymnasium
  path also asks ALE for at most 100,000 frames (25k steps, noop frames included), which would end
  a few very long evaluation episodes earlier.

Interventions (rlplastic.interventions.InterventionOptions, every interval in gradient steps):
--reset hare-tortoise (with --ema), head, shrink-perturb, redo; --continual cbp, noise, lifecycle.
The run folder, logs, checkpoints and evaluation are rlplastic.runs.Run's (RunOptions' flags).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from rlplastic.augment import drq_augment
from rlplastic.cli import cli_with_presets
from rlplastic.cuda_graphs import CapturedStep, graph_capture_available
from rlplastic.diagnostics import PlasticityProbe
from rlplastic.init import xavier_uniform_zero_bias
from rlplastic.interventions import InterventionOptions, build_interventions, ema_target, swap_in_chosen_lifecycle
from rlplastic.replay import FrameReplay
from rlplastic.runs import Run, RunOptions, run_problems
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
    interventions' per-step work) once in a CUDA graph and replay it; ignored on the CPU, and off
    when an intervention decides on the host every step (--continual cbp, noise, lifecycle)"""

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
    "drq-eps": ("DrQ(epsilon) as dopamine's DrQ_eps.gin (the defaults)", Args()),
    "hare-tortoise": ("Hare & Tortoise's DrQ (Lee et al. 2024, Table 1): replay ratio 2, EMA target 0.995, "
                      "hare <- tortoise every 4,000 gradient steps",
                      Args(updates_per_step=2, interventions=InterventionOptions(reset=("hare-tortoise",), ema=0.995))),
    "cpu-smoke": ("a few minutes on a CPU: 3,000 steps, a 10-episode evaluation",
                  Args(env_id="Pong", total_steps=3_000, run=RunOptions(eval_episodes=10, device="cpu"))),
}  # fmt: skip


def validate(args: Args) -> list[str]:
    """Every problem with the arguments, each naming the value and what is allowed."""
    problems = run_problems(args)  # --env-id, --total-steps and the run's options
    for name in ("n_step", "updates_per_step"):
        if getattr(args, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a positive integer")
    for name in ("learning_starts", "epsilon_decay_steps"):
        if getattr(args, name) < 0:
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 0")
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(self.encoder(x / 255.0))
        advantage = self.advantage(h)
        return self.value(h) + advantage - advantage.mean(1, keepdim=True)


HEAD_MODULES = ("head", "advantage", "value")  # what --reset head re-initializes


# ALGO LOGIC
def double_dqn_target(
    returns: torch.Tensor, discounts: torch.Tensor, next_q_online: torch.Tensor, next_q_target: torch.Tensor
) -> torch.Tensor:
    """R^(n) + gamma^n * Q_target(s', argmax_a Q_online(s', a)); discounts is 0 past a terminal."""
    best = next_q_online.argmax(1, keepdim=True)
    return returns + discounts * next_q_target.gather(1, best).squeeze(1)


def build_learner(args: Args, num_actions: int, device: torch.device):
    """The online network, the target network (the online one itself without --ema), the optimizer
    (capturable on CUDA when the update may be graph-captured: its step count stays on the device)."""
    q_network = QNetwork(num_actions).to(device)
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


def main(args: Args) -> dict:
    # the run: its folder, logs, checkpoints, results and random streams; exits on invalid arguments
    run = Run("drq", args, validate(args), method_label(args), __file__)
    device, generator = run.device, run.generator
    env = run.make_env()
    q_network, target_network, optimizer = build_learner(args, int(env.action_space.n), device)
    replay = FrameReplay(args.buffer_size, args.n_step, args.gamma, device=device, generator=generator)
    sample_states = lambda n: replay.sample(n).states  # noqa: E731
    target = None if target_network is q_network else target_network
    interventions = build_interventions(args.interventions, q_network, target, optimizer, sample_states,
                                        xavier_uniform_zero_bias, HEAD_MODULES)  # fmt: skip
    probe = PlasticityProbe(q_network, probe_batch=None)  # remembers the initial weights; batch comes from replay
    run.keep(q_network=q_network, optimizer=optimizer, interventions=interventions, replay=replay, probe=probe)
    if target is not None:
        run.keep(target_network=target)

    def train_step() -> None:
        """One gradient step and the interventions' per-step device work, summed into the log
        accumulators on the device: the unit a CUDA graph captures."""
        losses = update(args, q_network, target_network, optimizer, replay, generator)
        interventions.device_step()
        run.losses.add(losses)

    use_graph = args.cuda_graph and graph_capture_available(device) and interventions.graph_safe
    captured = CapturedStep(train_step, generators=[generator]) if use_graph else None
    update_mode = "cuda-graph" if captured else "eager"
    print(f"drq: update {update_mode}", flush=True)

    def greedy_actions(observations: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            q = q_network(torch.as_tensor(observations, device=device))
        return q.argmax(1).cpu().numpy()

    # TRAINING LOOP
    explore = LinearEpsilon(args.learning_starts, args.epsilon_decay_steps, args.epsilon_final)  # dopamine's
    saved = run.resume()
    obs = saved["obs"] if saved else env.reset()[0]
    for step in run.steps():
        epsilon = explore(step - 1)  # step - 1 agent steps taken so far
        action = run.epsilon_greedy(epsilon, obs, greedy_actions)

        # The update is queued before the env steps, so on a GPU its kernels run while the CPU
        # steps the emulator. (dopamine trains just before choosing the action instead; acting
        # on parameters one update older is the only difference.)
        if step >= args.learning_starts and replay.num_sampleable > 0:
            for _ in range(args.updates_per_step):
                if captured:  # one graph replay on CUDA
                    captured()
                else:
                    train_step()
                interventions.host_step()  # the one place interventions enter: schedules and rare events
                run.losses.tick()

        obs = run.env_step(replay, obs, action, step)  # a life loss is a terminal in replay, as in dopamine
        if run.report_due(step):
            run.report(step, {"epsilon": epsilon}, interventions.metrics())
        run.diagnose(step, probe, sample_states, ready=replay.num_sampleable > 0)
        run.evaluate_if_due(step, greedy_actions, [q_network])
        run.checkpoint(step, obs=obs)

    return run.finish(greedy_actions, [q_network], {"update_mode": update_mode}, models={"q_network": q_network})


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main(cli_with_presets(Args, PRESETS, __doc__))
