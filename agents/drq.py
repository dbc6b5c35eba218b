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

    python agents/drq.py --env-id Pong --updates-per-step 2 --ema 0.995 --reset hare-tortoise
    python agents/drq.py --env-id Pong --updates-per-step 2 --reset head --head-reset-every 20000
    python agents/drq.py --env-id Pong --updates-per-step 2 --ema 0.995 --reset hare-tortoise head \
        --head-reset-every 40000

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

Interventions: --reset hare-tortoise --ema 0.995, --reset head, --reset shrink-perturb,
--reset redo, --reset cbp, --reset noise (combinable), --lifecycle.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from rlplastic.envs.atari import MAX_EPISODE_STEPS, canonical_game, clip_reward, make_atari100k_env
from torch.utils.tensorboard import SummaryWriter

from rlplastic.augment import drq_augment
from rlplastic.cuda_graphs import CapturedStep, graph_capture_available
from rlplastic.diagnostics import PlasticityProbe
from rlplastic.evaluation import evaluate_episodes
from rlplastic.init import xavier_uniform_zero_bias
from rlplastic.interventions import (
    ContinualBackprop,
    GradientNoise,
    HareTortoise,
    HeadReset,
    Interventions,
    LifecycleConv2d,
    LifecycleLinear,
    ReDo,
    ShrinkPerturb,
    lifecycle_metrics,
    swap_in_lifecycle,
)
from rlplastic.replay import FrameReplay
from rlplastic.runs import (
    RESUMABLE_CHANGES,
    Progress,
    atomic_torch_save,
    atomic_write_json,
    device_generator,
    git_commit,
    hold_run_folder,
    hparams_markdown,
    load_checkpoint,
    log_final_evaluation,
    memory_problem,
    output_dir_problems,
    random_states,
    resolve_device,
    restore_random_states,
    save_checkpoint,
    seed_everything,
    start_tracking,
    stop_if_not_finite,
    tracking_problems,
)
from rlplastic.schedules import linearly_decaying_epsilon


@dataclass
class Args:
    env_id: str = "Breakout"
    """Atari-100k game: a name such as Pong or MsPacman, or an ALE id such as ALE/Pong-v5"""
    seed: int = 1
    """seed of the environment, the network, replay sampling and augmentation"""
    total_steps: int = 100_000
    """agent steps of interaction (100k = 400k frames, the Atari-100k budget)"""
    learning_starts: int = 1_600
    """agent steps of random play before the first update (also the epsilon warm-up)"""
    eval_episodes: int = 100
    """episodes of the final evaluation"""
    eval_epsilon: float = 0.001
    """exploration rate during the final evaluation"""
    eval_envs: int = 8
    """environments stepped in lockstep during evaluation (batches the network's forward)"""
    eval_every: int = 0
    """agent steps between evaluations during training (dopamine evaluates every 10,000); each point
    goes into results.json's eval_curve and tensorboard's eval/mean_return; 0 = only the final one"""
    eval_every_episodes: int = 100
    """episodes of each evaluation during training (--eval-every); fewer make them cheaper"""
    max_episode_steps: int = MAX_EPISODE_STEPS
    """cap on an episode's agent steps, training and evaluation (27k = 108k frames)"""
    output_dir: str | None = None
    """run folder for results.json and tensorboard files; default runs/{game}__{method}__{seed}__{time}"""
    exp_name: str | None = None
    """method label: names the run folder and groups runs in reports; default drq plus the chosen
    interventions, e.g. drq+hare-tortoise+head"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where the network, replay and augmentation live: auto takes cuda when present"""
    deterministic: bool = True
    """deterministic cuDNN kernels; on the CPU the same seed gives bit-identical results"""
    cuda_graph: bool = True
    """on CUDA, capture the whole update (sampling, augmentation, loss, backward, Adam, the
    interventions' per-step work) once in a CUDA graph and replay it; ignored on the CPU, and off
    when an intervention decides on the host every step (cbp, noise, lifecycle)"""

    # Algorithm: dopamine DrQ_eps.gin
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
    """gradient updates per agent step once learning has started"""
    ema: float = 0.0
    """momentum of an EMA target network (0.995 = tau 0.005); 0 = the reference's target, a copy of
    the online network every step"""
    epsilon_final: float = 0.01
    """exploration rate at the end of the decay"""
    epsilon_decay_steps: int = 5_000
    """agent steps, after learning_starts, over which epsilon falls linearly from 1 to epsilon_final"""
    augment: bool = True
    """random shift (pad 4) and intensity augmentation of states and next states"""

    # Plasticity interventions (rlplastic.interventions), stepped after every optimizer step
    reset: tuple[Literal["hare-tortoise", "head", "shrink-perturb", "redo", "cbp", "noise"], ...] = ()
    """interventions to switch on, combinable: hare-tortoise (needs --ema), head, shrink-perturb,
    redo, cbp (continual backprop), noise (gradient noise)"""
    reset_every: int | None = None
    """gradient steps between resets for every chosen method without its own interval flag
    (defaults: hare-tortoise 4,000, head 20,000, shrink-perturb 20,000, redo 1,000)"""
    ht_reset_every: int | None = None
    """Hare & Tortoise: gradient steps between hare <- tortoise copies (default --reset-every or 4,000)"""
    head_reset_every: int | None = None
    """head reset: gradient steps between re-inits of the dueling head (default --reset-every or 20,000)"""
    sp_every: int | None = None
    """Shrink & Perturb: gradient steps between applications (default --reset-every or 20,000)"""
    sp_shrink: float = 0.4
    """Shrink & Perturb: factor on the current parameters (Ash & Adams: 0.4)"""
    sp_perturb: float = 0.1
    """Shrink & Perturb: factor on a fresh init (Ash & Adams: 0.1)"""
    redo_every: int | None = None
    """ReDo: gradient steps between recycling passes (default --reset-every or 1,000)"""
    redo_tau: float = 0.1
    """ReDo: a unit is dormant when its normalized score is <= tau"""
    redo_batch: int = 256
    """ReDo: states from replay used to score units"""
    cbp_rate: float = 1e-4
    """continual backprop: fraction of mature units replaced per step"""
    cbp_decay: float = 0.99
    """continual backprop: decay of the utility averages"""
    cbp_maturity: int = 100
    """continual backprop: steps before a unit may be replaced"""
    noise_sigma: float = 0.01
    """gradient noise (noisy SGD, Joudaki et al.): sigma_0 of the isotropic noise N(0, sigma_t^2 ||g||^2 I)"""
    noise_decay: float = 0.999
    """gradient noise: per-step decay lambda of sigma_t = sigma_0 * lambda^t"""
    lifecycle: bool = False
    """replace the hidden layers by lifecycle layers (Yang 2025)"""
    lifecycle_lifespan: tuple[int, int] = (1_000, 5_000)
    """lifecycle: range of each unit's lifespan in gradient steps"""
    lifecycle_recovery: tuple[int, int] = (100, 500)
    """lifecycle: range of each unit's recovery time in gradient steps"""
    lifecycle_warmup: int = 10
    """lifecycle: steps over which a revived unit's output ramps up (0 = no warm-up)"""
    lifecycle_revival: Literal["memory", "he", "xavier"] = "memory"
    """lifecycle: revive from saved weights, or by a fresh He / Xavier init (ablations)"""

    # Logging and checkpoints
    diag_every: int = 5_000
    """agent steps between plasticity diagnostics (tensorboard plasticity/..., results.json); 0 = never"""
    diag_batch: int = 256
    """replay states in the fixed probe batch of the diagnostics"""
    checkpoint_every: int = 10_000
    """agent steps between checkpoints (networks, optimizer, replay, env and RNG states) in the run
    folder; run again with the same --output-dir to resume an interrupted run; 0 = never"""
    log_every: int = 1_000
    """agent steps between progress lines and tensorboard scalars"""
    track_tensorboard: bool = True
    """write tensorboard event files into the run folder"""
    track: bool = False
    """also log to Weights & Biases (CleanRL's convention: tensorboard scalars synced); needs wandb"""
    wandb_project_name: str = "rlplastic"
    """the Weights & Biases project of --track"""
    wandb_entity: str | None = None
    """the Weights & Biases entity (team) of --track"""
    save_model: bool = False
    """after training, save the online network's weights (a plain state_dict, 16 MB) as
    q_network.pt in the run folder, e.g. to evaluate it again at another epsilon"""


def validate(args: Args) -> list[str]:
    """Every problem with the arguments, each naming the value and what is allowed."""
    problems = []
    try:
        canonical_game(args.env_id)
    except ValueError as e:
        problems.append(str(e))
    positive = ("total_steps", "batch_size", "buffer_size", "n_step", "updates_per_step", "log_every")
    if args.diag_every < 0 or args.diag_batch <= 0:
        problems.append(f"--diag-every {args.diag_every} / --diag-batch {args.diag_batch}: need >= 0 and > 0")
    if args.checkpoint_every < 0:
        problems.append(f"--checkpoint-every {args.checkpoint_every}: must be >= 0 (0 = never)")
    for name in positive:
        if getattr(args, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a positive integer")
    non_negative = ("learning_starts", "eval_episodes", "epsilon_decay_steps")
    for name in non_negative:
        if getattr(args, name) < 0:
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 0")
    if args.eval_every < 0 or args.eval_every_episodes <= 0:
        problems.append(
            f"--eval-every {args.eval_every} / --eval-every-episodes {args.eval_every_episodes}: "
            "need >= 0 (0 = final evaluation only) and > 0"
        )
    if args.eval_envs <= 0:
        problems.append(f"--eval-envs {args.eval_envs}: must be a positive integer")
    if args.max_episode_steps <= 0:
        problems.append(f"--max-episode-steps {args.max_episode_steps}: must be a positive integer")
    if args.learning_starts > args.total_steps:
        problems.append(f"--learning-starts {args.learning_starts}: must be <= --total-steps {args.total_steps}")
    if args.buffer_size > 0 and args.batch_size > args.buffer_size:
        problems.append(f"--batch-size {args.batch_size}: must be <= --buffer-size {args.buffer_size}")
    if args.n_step > 0 and args.buffer_size <= args.n_step + 4:
        problems.append(f"--buffer-size {args.buffer_size}: must exceed --n-step + 4 = {args.n_step + 4}")
    for name in ("eval_epsilon", "epsilon_final"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must lie in [0, 1]")
    if not 0.0 < args.gamma <= 1.0:
        problems.append(f"--gamma {args.gamma}: must lie in (0, 1]")
    if not 0.0 <= args.ema < 1.0:
        problems.append(f"--ema {args.ema}: must lie in [0, 1) (0 = no EMA target)")
    if not args.learning_rate > 0 or not args.adam_eps > 0:
        problems.append(f"--learning-rate {args.learning_rate} / --adam-eps {args.adam_eps}: must be > 0")
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        problems.append(str(e))
        device = None
    problems += validate_interventions(args)
    problems += output_dir_problems(args.output_dir)
    problems += tracking_problems(args.track, args.track_tensorboard)
    if args.batch_size > args.buffer_size:
        problems.append(f"--batch-size {args.batch_size}: larger than the replay (--buffer-size {args.buffer_size})")
    if device is not None and args.buffer_size > 0:
        needed = FrameReplay.memory_bytes(args.buffer_size)
        problem = memory_problem(needed, device, f"--buffer-size {args.buffer_size} (the replay)")
        problems += [problem] if problem else []
    return problems


# Methods that each decide which units to replace: two of them on the same units contradict each other.
EXCLUSIVE_UNIT_METHODS = ("redo", "cbp", "lifecycle")


def validate_interventions(args: Args) -> list[str]:
    problems = []
    chosen = list(args.reset) + (["lifecycle"] if args.lifecycle else [])
    repeated = sorted({r for r in args.reset if args.reset.count(r) > 1})
    if repeated:
        problems.append(f"--reset {' '.join(args.reset)}: {', '.join(repeated)} given twice")
    if "hare-tortoise" in args.reset and args.ema <= 0:
        problems.append("--reset hare-tortoise needs --ema > 0 (e.g. 0.995): the tortoise is the EMA target")
    unit_methods = [m for m in EXCLUSIVE_UNIT_METHODS if m in chosen]
    if len(unit_methods) > 1:
        problems.append(f"{' and '.join(unit_methods)} both replace units: choose one")
    for name in ("reset_every", "ht_reset_every", "head_reset_every", "sp_every", "redo_every"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            problems.append(f"--{name.replace('_', '-')} {value}: must be a positive integer")
    if args.redo_tau < 0 or args.redo_batch <= 0:
        problems.append(f"--redo-tau {args.redo_tau} / --redo-batch {args.redo_batch}: need tau >= 0 and batch > 0")
    if not 0 <= args.cbp_rate <= 1 or not 0 <= args.cbp_decay < 1 or args.cbp_maturity < 0:
        problems.append(
            f"--cbp-rate {args.cbp_rate} / --cbp-decay {args.cbp_decay} / --cbp-maturity {args.cbp_maturity}: "
            "need rate in [0, 1], decay in [0, 1), maturity >= 0"
        )
    if args.noise_sigma < 0 or not 0 < args.noise_decay <= 1:
        problems.append(f"--noise-sigma {args.noise_sigma} / --noise-decay {args.noise_decay}: need >= 0 and (0, 1]")
    for name in ("lifecycle_lifespan", "lifecycle_recovery"):
        lo, hi = getattr(args, name)
        if not 1 <= lo <= hi:
            problems.append(f"--{name.replace('_', '-')} {lo} {hi}: need 1 <= low <= high")
    if args.lifecycle_warmup < 0:
        problems.append(f"--lifecycle-warmup {args.lifecycle_warmup}: must be >= 0")
    return problems


# The arguments the default method label shows; a sweep adds key=value for any other it varies.
LABELLED_ARGS = {"reset", "lifecycle", "exp_name"}


def method_label(args: Args) -> str:
    """The name reports group runs by: --exp-name, or drq plus the chosen interventions."""
    return args.exp_name or "+".join(["drq", *args.reset, *(["lifecycle"] if args.lifecycle else [])])


def evaluate(args: Args, game: str, greedy_actions, num_episodes: int, seed: int):
    """Epsilon-greedy episodes with the current parameters, on fresh environments seeded apart
    from training (the training environment and RNG streams are untouched)."""
    return evaluate_episodes(
        lambda env_seed: make_atari100k_env(game, env_seed, max_episode_steps=args.max_episode_steps),
        greedy_actions,
        num_episodes=num_episodes,
        num_envs=args.eval_envs,
        epsilon=args.eval_epsilon,
        seed=seed,
    )


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
    if args.lifecycle:
        swap_in_lifecycle(
            q_network, lifespan=args.lifecycle_lifespan, recovery=args.lifecycle_recovery,
            warmup=args.lifecycle_warmup, revival=args.lifecycle_revival,
        )  # fmt: skip
    # fused: one kernel for all tensors, 6x faster than the default loop on a 2-core CPU too
    capturable = args.cuda_graph and device.type == "cuda"
    optimizer = torch.optim.Adam(
        q_network.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True, capturable=capturable
    )
    for layer in q_network.modules():
        if isinstance(layer, LifecycleLinear | LifecycleConv2d):
            layer.bind_optimizer(optimizer)
    target_network = q_network
    if args.ema > 0:
        target_network = copy.deepcopy(q_network)
        target_network.requires_grad_(False)
    return q_network, target_network, optimizer


def interval(args: Args, own: int | None, default: int) -> int:
    return own or args.reset_every or default


def build_interventions(
    args: Args, q_network: QNetwork, target_network: QNetwork, optimizer: torch.optim.Optimizer, replay: FrameReplay
) -> Interventions:
    """The interventions stepped after every optimizer step, in this order. With --ema the EMA
    target is the first: Hare & Tortoise's tortoise, which without hare-tortoise never resets."""
    interventions = []
    networks = [q_network] if target_network is q_network else [q_network, target_network]
    if args.ema > 0:
        every = interval(args, args.ht_reset_every, 4_000) if "hare-tortoise" in args.reset else 0
        interventions.append(HareTortoise(q_network, target_network, momentum=args.ema, reset_every=every))
    if "head" in args.reset:
        every = interval(args, args.head_reset_every, 20_000)
        interventions.append(HeadReset(networks, list(HEAD_MODULES), every, optimizer, xavier_uniform_zero_bias))
    if "shrink-perturb" in args.reset:
        every = interval(args, args.sp_every, 20_000)
        interventions.append(
            ShrinkPerturb(networks, {"": (args.sp_shrink, args.sp_perturb)}, every, optimizer, xavier_uniform_zero_bias)
        )
    if "redo" in args.reset:
        every = interval(args, args.redo_every, 1_000)
        batch_fn = lambda: replay.sample(args.redo_batch).states  # noqa: E731
        interventions.append(
            ReDo(q_network, optimizer, batch_fn, tau=args.redo_tau, every=every, init_fn=xavier_uniform_zero_bias)
        )
    if "cbp" in args.reset:
        interventions.append(
            ContinualBackprop(q_network, optimizer, args.cbp_rate, args.cbp_decay, args.cbp_maturity,
                              init_fn=xavier_uniform_zero_bias)  # the network's own init
        )  # fmt: skip
    if "noise" in args.reset:
        interventions.append(GradientNoise(optimizer, args.noise_sigma, args.noise_decay))
    return Interventions(interventions)


def update(
    args: Args,
    q_network: QNetwork,
    target_network: QNetwork,
    optimizer: torch.optim.Optimizer,
    replay: FrameReplay,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
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
    return loss.detach(), q.detach().mean()


def main(args: Args) -> dict:
    problems = validate(args)
    if problems:
        sys.exit("drq: invalid arguments:\n  " + "\n  ".join(problems))

    game = canonical_game(args.env_id)
    device = resolve_device(args.device)
    method = method_label(args)
    run_name = f"{game}__{method}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.output_dir or Path("runs") / run_name)
    hold_run_folder(run_dir, "drq")  # one writer per folder, released by the OS if this process dies
    config = asdict(args) | {"env_id": game, "device": str(device)}
    code_commit = git_commit(__file__)  # the code that runs, read now: HEAD may move while it runs
    checkpoint_path = run_dir / "checkpoint.pt"
    # a run may resume with other logging arguments (rlplastic.runs), and save its network or not
    checkpoint = load_checkpoint(checkpoint_path, config, RESUMABLE_CHANGES | {"save_model"}, device, "drq")
    start_step = checkpoint["step"] + 1 if checkpoint else 1
    # purge_step drops events logged after the checkpoint by the interrupted run
    if args.track:  # before the SummaryWriter, so that wandb syncs its scalars
        start_tracking(args.wandb_project_name, args.wandb_entity, run_dir, run_dir.name, config)
    writer = SummaryWriter(str(run_dir), purge_step=start_step) if args.track_tensorboard else None
    if writer and not checkpoint:
        writer.add_text("hyperparameters", hparams_markdown(config))
    print(f"drq: {game} seed {args.seed} on {device}, {args.total_steps} steps -> {run_dir}", flush=True)

    seed_everything(args.seed, args.deterministic)
    generator = device_generator(device, args.seed)
    env = make_atari100k_env(game, args.seed, max_episode_steps=args.max_episode_steps)
    num_actions = int(env.action_space.n)
    rng = np.random.default_rng(args.seed)

    q_network, target_network, optimizer = build_learner(args, num_actions, device)
    replay = FrameReplay(args.buffer_size, args.n_step, args.gamma, device=device, generator=generator)
    interventions = build_interventions(args, q_network, target_network, optimizer, replay)
    probe = PlasticityProbe(q_network, probe_batch=None)  # remembers the initial weights; batch comes from replay

    def train_step() -> None:
        """One gradient step and the interventions' per-step device work, summed into the log
        accumulators on the device: the unit a CUDA graph captures."""
        loss, q_mean = update(args, q_network, target_network, optimizer, replay, generator)
        interventions.device_step()
        loss_sum.add_(loss)
        q_sum.add_(q_mean)

    use_graph = args.cuda_graph and graph_capture_available(device) and not args.lifecycle and interventions.graph_safe
    captured = CapturedStep(train_step, generators=[generator]) if use_graph else None
    update_mode = "cuda-graph" if captured else "eager"
    print(f"drq: update {update_mode}", flush=True)

    def greedy_actions(observations: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            q = q_network(torch.as_tensor(observations, device=device))
        return q.argmax(1).cpu().numpy()

    # TRAINING LOOP
    progress = Progress(args.total_steps, args.log_every, start=start_step - 1)
    episodes: list[dict] = []
    train_log: list[dict] = []
    diagnostics: list[dict] = []
    eval_curve: list[dict] = []  # {"step", "mean", "returns"} of every evaluation, the final one last
    loss_sum = torch.zeros((), device=device)  # summed on the device; read once per log interval
    q_sum = torch.zeros((), device=device)
    updates_since_log = 0
    elapsed_before = 0.0  # train time of earlier, interrupted sessions of this run
    if checkpoint:
        q_network.load_state_dict(checkpoint["q_network"])
        target_network.load_state_dict(checkpoint["target_network"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        interventions.load_state_dict(checkpoint["interventions"])
        replay.load_state_dict(checkpoint["replay"])
        env.set_state(checkpoint["env"])
        obs = checkpoint["obs"]
        restore_random_states(checkpoint, rng, generator)
        episodes, train_log, diagnostics = checkpoint["episodes"], checkpoint["train_log"], checkpoint["diagnostics"]
        eval_curve = checkpoint["eval_curve"]
        probe.initial, probe.probe_batch = checkpoint["probe_initial"], checkpoint["probe_batch"]
        loss_sum += checkpoint["loss_sum"]
        q_sum += checkpoint["q_sum"]
        updates_since_log, elapsed_before = checkpoint["updates_since_log"], checkpoint["train_time_s"]
        print(f"drq: resumed from {checkpoint_path} at step {checkpoint['step']}", flush=True)
        del checkpoint
    else:
        obs, _ = env.reset()
    start_time = time.time()
    for step in range(start_step, args.total_steps + 1):
        epsilon = linearly_decaying_epsilon(
            step - 1, args.learning_starts, args.epsilon_decay_steps, args.epsilon_final
        )
        if rng.random() < epsilon:
            action = int(rng.integers(num_actions))
        else:
            action = int(greedy_actions(obs[None])[0])  # the loop's one host sync: the env needs it

        # The update is queued before the env steps, so on a GPU its kernels run while the CPU
        # steps the emulator. (dopamine trains just before choosing the action instead; acting
        # on parameters one update older is the only difference.)
        if step >= args.learning_starts and replay.num_sampleable > 0:
            for _ in range(args.updates_per_step):
                # the update and the interventions' device_step: one graph replay on CUDA, else eager
                if captured:
                    captured()
                else:
                    train_step()
                interventions.host_step()  # the one place interventions enter: schedules and rare events
                updates_since_log += 1

        next_obs, reward, terminated, truncated, info = env.step(action)
        # Life loss is a terminal for learning, yet the game goes on (dopamine's terminal_on_life_loss).
        replay.add(obs[-1], action, clip_reward(reward), terminated or info["life_loss"], truncated)
        obs = next_obs
        if terminated or truncated:
            episodes.append({"step": step, "return": info["episode"]["r"], "length": info["episode"]["l"]})
            if writer:
                writer.add_scalar("charts/episodic_return", info["episode"]["r"], step)
                writer.add_scalar("charts/episodic_length", info["episode"]["l"], step)
            obs, _ = env.reset()

        if progress.due(step):
            rate = progress.steps_per_second(step)
            fields: dict = {"eps": epsilon, "episodes": len(episodes)}
            if episodes:
                fields["return(last10)"] = float(np.mean([e["return"] for e in episodes[-10:]]))
            if updates_since_log:
                fields["td_loss"] = loss_sum.item() / updates_since_log
                fields["q"] = q_sum.item() / updates_since_log
                stop_if_not_finite("drq", {"td_loss": fields["td_loss"], "q": fields["q"]}, step, checkpoint_path)
                train_log.append({"step": step, "td_loss": fields["td_loss"], "q_values": fields["q"]})
                if writer:
                    writer.add_scalar("losses/td_loss", fields["td_loss"], step)
                    writer.add_scalar("losses/q_values", fields["q"], step)
                loss_sum.zero_(), q_sum.zero_()
                updates_since_log = 0
            if writer:
                writer.add_scalar("charts/SPS", rate, step)
                writer.add_scalar("charts/epsilon", epsilon, step)
                for key, value in (interventions.metrics() | lifecycle_metrics(q_network)).items():
                    writer.add_scalar(f"interventions/{key}", value, step)  # what each one has done
            progress.report(step, rate, **fields)

        if args.diag_every and step % args.diag_every == 0 and replay.num_sampleable > 0:
            if probe.probe_batch is None:  # fixed at the first measurement, so values are comparable
                probe.probe_batch = replay.sample(args.diag_batch).states
            metrics = probe.measure()
            diagnostics.append({"step": step, **metrics})
            if writer:
                for key, value in metrics.items():
                    writer.add_scalar(f"plasticity/{key}", value, step)

        if args.eval_every and step % args.eval_every == 0 and step < args.total_steps:
            q_network.eval()
            point = evaluate(args, game, greedy_actions, args.eval_every_episodes, args.seed + 20_000 + step)
            q_network.train()
            eval_curve.append({"step": step, "mean": point.mean, "returns": point.returns})
            if writer:
                writer.add_scalar("eval/mean_return", point.mean, step)
            print(f"drq: step {step} eval mean {point.mean} over {len(point.returns)} episodes", flush=True)

        if args.checkpoint_every and step % args.checkpoint_every == 0 and step < args.total_steps:
            # never replace the last good checkpoint by a diverged one (one read per checkpoint)
            stop_if_not_finite("drq", {"td_loss": loss_sum.item(), "q": q_sum.item()}, step, checkpoint_path)
            save_checkpoint(
                checkpoint_path,
                {
                    "step": step,
                    "config": config,
                    "q_network": q_network.state_dict(),
                    "target_network": target_network.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "interventions": interventions.state_dict(),
                    "replay": replay.state_dict(),
                    "env": env.get_state(),
                    "obs": obs,
                    **random_states(rng, generator, device),
                    "episodes": episodes,
                    "train_log": train_log,
                    "diagnostics": diagnostics,
                    "eval_curve": eval_curve,
                    "probe_initial": probe.initial,
                    "probe_batch": probe.probe_batch,
                    "loss_sum": loss_sum,
                    "q_sum": q_sum,
                    "updates_since_log": updates_since_log,
                    "train_time_s": elapsed_before + time.time() - start_time,
                },
                "drq",
            )
    train_time = elapsed_before + time.time() - start_time
    if args.save_model:
        atomic_torch_save(run_dir / "q_network.pt", {k: v.cpu() for k, v in q_network.state_dict().items()})

    # FINAL EVALUATION
    print(f"drq: evaluating {args.eval_episodes} episodes (epsilon {args.eval_epsilon})", flush=True)
    q_network.eval()
    # eval episodes never replay the training seed's starts
    evaluation = evaluate(args, game, greedy_actions, args.eval_episodes, args.seed + 10_000)
    if evaluation.returns:
        eval_curve.append({"step": args.total_steps, "mean": evaluation.mean, "returns": evaluation.returns})
    results = {
        "agent": "drq",
        "method": method,
        "game": game,
        "seed": args.seed,
        "total_steps": args.total_steps,
        "eval_episodes": len(evaluation.returns),
        "eval_returns": evaluation.returns,
        "eval_lengths": evaluation.lengths,
        "eval_mean": evaluation.mean,
        "train_episodes": episodes,
        "train_log": train_log,
        "diagnostics": diagnostics,
        "eval_curve": eval_curve,
        "update_mode": update_mode,
        "wall_time_s": elapsed_before + time.time() - start_time,
        "train_time_s": train_time,
        "config": config,
        "git_commit": code_commit,
        "torch_version": torch.__version__,
    }
    if writer:
        log_final_evaluation(writer, evaluation.returns, evaluation.mean, args.total_steps)
        writer.close()
    atomic_write_json(run_dir / "results.json", results)
    checkpoint_path.unlink(missing_ok=True)  # the results supersede it, and it holds the whole replay
    print(f"drq: eval mean {evaluation.mean} over {len(evaluation.returns)} episodes -> {run_dir / 'results.json'}")
    env.close()
    return results


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main(tyro.cli(Args))
