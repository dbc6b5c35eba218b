"""BBF ("Bigger, Better, Faster", Schwarzer et al. 2023) on Atari-100k, in one file.

Hyperparameters of the reference code (google-research bigger_better_faster: bbf/configs/BBF.gin,
agents/spr_agent.py, spr_networks.py): Impala-CNN width 4, C51 with a dueling head, SPR,
prioritized replay, n-step 10 -> 3 and gamma 0.97 -> 0.997 annealed after every reset, EMA target
(tau 0.005) for backups, SPR targets and acting, AdamW with weight decay, and resets: encoder and
transition model shrunk halfway toward a fresh init, projection, predictor and head re-initialized,
for the online and the target network alike, three times in a 100k run (after 20,001, 40,002 and
60,003 agent steps, the reference's schedule; see ResetSchedule).

    python agents/bbf.py --env-id Breakout                  # BBF.gin: replay ratio 2, resets every 20k steps
    python agents/bbf.py --env-id Pong --replay-ratio 8     # RR8: resets every 5k steps (40k gradient steps)
    python agents/bbf.py --env-id Pong --reset hare-tortoise --no-spr   # Hare & Tortoise's BBF variant
    python agents/bbf.py --env-id Pong --width-scale 1 --hidden-dim 256 --total-steps 5000  # CPU smoke run

Which published number each configuration compares with: the default (2 updates per step, BBF.gin)
with the authors' own RR2 per-run scores (scores/RR2_BBF.csv in the reference repository; IQM about
0.89), --replay-ratio 8 with the paper's headline BBF (IQM about 1.045, scores/RR8_BBF.csv).

Differences from the reference, on purpose:
- replay priorities are sampled from all slots at once on the device instead of a sum tree;
- priorities: every sampled transition gets sqrt(its C51 loss + 1e-10), the rule the paper and the
  reference's comments describe. The reference's code reshapes its loss to shape (2,) (the mean
  over each of its two grouped batches) and so writes new priorities to only the first two sampled
  indices per step; the rest keep the maximum priority they were added with, which makes its
  replay close to uniform. We keep the documented rule: a user who switches PER on expects PER;
- n-step returns stop at the first terminal among the n rewards. The reference's subsequence
  replay misses a terminal at the window's last position (t + n - 1) and bootstraps across it;
  we keep the correct cut, which only differs on windows that end exactly on a life loss;
- the reset interval is in agent steps and defaults to 40,000 gradient steps' worth at the chosen
  replay ratio (20k at RR2 as BBF.gin, 5k at RR8 as the reference's RR8 configuration);
- --amp bf16 runs the forward passes under torch.autocast in bfloat16 (the reference's half
  precision is float16 with loss scaling); losses are computed in float32.

Resets are expressed with rlplastic.interventions.ShrinkPerturb (one object, both networks, each
with its own fresh draw) and the EMA target with rlplastic.interventions.HareTortoise, which copies
the target into the online network every --ht-reset-every gradient steps with --reset hare-tortoise.
"""

from __future__ import annotations

import copy
import math
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
from rlplastic.diagnostics import PlasticityProbe
from rlplastic.evaluation import evaluate_episodes
from rlplastic.init import xavier_uniform_zero_bias
from rlplastic.interventions import ContinualBackprop, GradientNoise, HareTortoise, Interventions, ReDo, ShrinkPerturb
from rlplastic.replay import FrameReplay, PrioritizedFrameReplay
from rlplastic.runs import (
    RESUMABLE_CHANGES,
    Progress,
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
    """seed of the environment, the networks, replay sampling and augmentation"""
    total_steps: int = 100_000
    """agent steps of interaction (100k = 400k frames, the Atari-100k budget)"""
    learning_starts: int = 2_000
    """agent steps of random play before the first update"""
    eval_episodes: int = 100
    """episodes of the final evaluation"""
    eval_epsilon: float = 0.001
    """exploration rate during the final evaluation"""
    eval_envs: int = 8
    """environments stepped in lockstep during evaluation (batches the network's forward)"""
    max_episode_steps: int = MAX_EPISODE_STEPS
    """cap on an episode's agent steps, training and evaluation (27k = 108k frames)"""
    output_dir: str | None = None
    """run folder for results.json and tensorboard files; default runs/{game}__{method}__{seed}__{time}"""
    exp_name: str | None = None
    """method label: names the run folder and groups runs in reports; default bbf plus the chosen
    interventions and variants, e.g. bbf+hare-tortoise-nospr"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where the networks, replay and augmentation live: auto takes cuda when present"""
    deterministic: bool = True
    """deterministic cuDNN kernels; on the CPU the same seed gives bit-identical results"""
    amp: Literal["fp32", "bf16"] = "fp32"
    """precision of the forward passes: bf16 autocast (about 2x throughput on recent GPUs)"""

    # Network: Impala-CNN encoder, projection, dueling C51 head, SPR transition model and predictor
    width_scale: int = 4
    """Impala channel multiplier: stages of (16, 32, 32) x width_scale channels"""
    hidden_dim: int = 2048
    """width of the projection (and predictor) layer"""
    num_atoms: int = 51
    """C51 atoms"""
    v_max: float = 10.0
    """C51 support [-v_max, v_max]"""

    # Algorithm: BBF.gin
    buffer_size: int = 200_000
    """replay capacity in agent steps"""
    batch_size: int = 32
    """transitions per gradient step"""
    replay_ratio: int = 2
    """gradient steps per agent step (BBF's 'replay ratio 64' = 64 / batch 32; RR8 variant: 8)"""
    n_step_start: int = 10
    """n of the n-step return right after a reset, annealed geometrically to n_step_end"""
    n_step_end: int = 3
    """n of the n-step return after anneal_steps gradient steps"""
    gamma_start: float = 0.97
    """discount right after a reset, annealed to gamma_end (1 - gamma falls geometrically)"""
    gamma_end: float = 0.997
    """discount after anneal_steps gradient steps"""
    anneal_steps: int = 10_000
    """gradient steps over which n-step and gamma anneal, restarting at every reset"""
    learning_rate: float = 1e-4
    """AdamW learning rate"""
    adam_eps: float = 1.5e-4
    """AdamW epsilon"""
    weight_decay: float = 0.1
    """AdamW weight decay (weights only, not biases)"""
    tau: float = 0.005
    """EMA target rate per gradient step (target <- (1 - tau) target + tau online)"""
    spr_steps: int = 5
    """SPR: future steps predicted by the transition model"""
    spr_weight: float = 5.0
    """SPR: weight of the self-predictive loss"""
    no_spr: bool = False
    """switch the SPR loss off (Hare & Tortoise's BBF variant runs without it)"""
    epsilon_final: float = 0.0
    """exploration rate at the end of the decay"""
    epsilon_decay_steps: int = 2_001
    """agent steps after learning_starts over which epsilon falls from 1 to epsilon_final"""
    augment: bool = True
    """random shift (pad 4) and intensity augmentation of every state the update sees"""
    reset_every: int | None = None
    """agent steps between BBF's resets; default 40,000 gradient steps' worth: 20,000 at replay
    ratio 2 (BBF.gin), 5,000 at 8; 0 = no resets"""
    no_resets_after: int = 100_000
    """a reset is skipped when the next one would come after this agent step (3 resets in 100k at RR2)"""
    encoder_shrink: float = 0.5
    """BBF reset: encoder and transition model <- shrink * theta + (1 - shrink) * fresh init"""

    # Plasticity interventions on top of BBF (rlplastic.interventions), stepped after every optimizer step
    reset: tuple[Literal["hare-tortoise", "shrink-perturb", "redo", "cbp", "noise"], ...] = ()
    """extra interventions, combinable: hare-tortoise (online <- EMA target every --ht-reset-every
    gradient steps), shrink-perturb (whole online network), redo, cbp (continual backprop), noise"""
    ht_reset_every: int = 4_000
    """Hare & Tortoise: gradient steps between hare <- tortoise copies"""
    sp_every: int = 20_000
    """Shrink & Perturb: gradient steps between applications"""
    sp_shrink: float = 0.4
    """Shrink & Perturb: factor on the current parameters"""
    sp_perturb: float = 0.1
    """Shrink & Perturb: factor on a fresh init"""
    redo_every: int = 1_000
    """ReDo: gradient steps between recycling passes"""
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

    # Logging and checkpoints
    diag_every: int = 5_000
    """agent steps between plasticity diagnostics (tensorboard plasticity/..., results.json); 0 = never"""
    diag_batch: int = 256
    """replay states in the fixed probe batch of the diagnostics"""
    checkpoint_every: int = 10_000
    """agent steps between checkpoints in the run folder; run again with the same --output-dir to
    resume an interrupted run; 0 = never"""
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


def validate(args: Args) -> list[str]:
    """Every problem with the arguments, each naming the value and what is allowed."""
    problems = []
    try:
        canonical_game(args.env_id)
    except ValueError as e:
        problems.append(str(e))
    positive = ("total_steps", "batch_size", "buffer_size", "replay_ratio", "log_every", "width_scale", "hidden_dim",
                "eval_envs", "max_episode_steps", "anneal_steps", "spr_steps", "ht_reset_every", "sp_every",
                "redo_every", "redo_batch", "diag_batch")  # fmt: skip
    for name in positive:
        if getattr(args, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a positive integer")
    if args.reset_every is not None and args.reset_every < 0:
        problems.append(f"--reset-every {args.reset_every}: must be >= 0 (0 = no resets)")
    for name in ("learning_starts", "eval_episodes", "epsilon_decay_steps", "diag_every",
                 "checkpoint_every", "no_resets_after", "cbp_maturity"):  # fmt: skip
        if getattr(args, name) < 0:
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 0")
    if args.num_atoms < 2:
        problems.append(f"--num-atoms {args.num_atoms}: must be >= 2")
    if not args.v_max > 0:
        problems.append(f"--v-max {args.v_max}: must be > 0")
    if not 1 <= args.n_step_end <= args.n_step_start:
        problems.append(f"--n-step-start {args.n_step_start} / --n-step-end {args.n_step_end}: need 1 <= end <= start")
    if args.spr_steps > args.n_step_start:
        problems.append(f"--spr-steps {args.spr_steps}: must be <= --n-step-start {args.n_step_start}")
    if not (0 < args.gamma_start < 1 and 0 < args.gamma_end < 1):
        problems.append(f"--gamma-start {args.gamma_start} / --gamma-end {args.gamma_end}: must lie in (0, 1)")
    if args.learning_starts > args.total_steps:
        problems.append(f"--learning-starts {args.learning_starts}: must be <= --total-steps {args.total_steps}")
    if args.batch_size > args.buffer_size:
        problems.append(f"--batch-size {args.batch_size}: must be <= --buffer-size {args.buffer_size}")
    if args.buffer_size <= args.n_step_start + 4:
        problems.append(f"--buffer-size {args.buffer_size}: must exceed --n-step-start + 4 = {args.n_step_start + 4}")
    for name in ("eval_epsilon", "epsilon_final", "tau", "encoder_shrink", "cbp_rate"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must lie in [0, 1]")
    if not args.learning_rate > 0 or not args.adam_eps > 0 or args.weight_decay < 0:
        problems.append(
            f"--learning-rate {args.learning_rate} / --adam-eps {args.adam_eps} / --weight-decay "
            f"{args.weight_decay}: need > 0, > 0, >= 0"
        )
    if args.spr_weight < 0:
        problems.append(f"--spr-weight {args.spr_weight}: must be >= 0")
    repeated = sorted({r for r in args.reset if args.reset.count(r) > 1})
    if repeated:
        problems.append(f"--reset {' '.join(args.reset)}: {', '.join(repeated)} given twice")
    if "redo" in args.reset and "cbp" in args.reset:
        problems.append("redo and cbp both replace units: choose one")
    if not 0 <= args.cbp_decay < 1 or args.noise_sigma < 0 or not 0 < args.noise_decay <= 1 or args.redo_tau < 0:
        problems.append(
            f"--cbp-decay {args.cbp_decay} / --noise-sigma {args.noise_sigma} / --noise-decay {args.noise_decay} / "
            f"--redo-tau {args.redo_tau}: need decay in [0, 1), sigma >= 0, noise decay in (0, 1], tau >= 0"
        )
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        problems.append(str(e))
        device = None
    if args.amp == "bf16" and device is not None and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        problems.append("--amp bf16: this GPU does not support bfloat16; use --amp fp32")
    problems += output_dir_problems(args.output_dir)
    problems += tracking_problems(args.track, args.track_tensorboard)
    if args.batch_size > args.buffer_size:
        problems.append(f"--batch-size {args.batch_size}: larger than the replay (--buffer-size {args.buffer_size})")
    if device is not None and args.buffer_size > 0:
        needed = FrameReplay.memory_bytes(args.buffer_size, prioritized=True)
        problem = memory_problem(needed, device, f"--buffer-size {args.buffer_size} (the replay)")
        problems += [problem] if problem else []
    return problems


# The arguments the default method label shows; a sweep adds key=value for any other it varies.
LABELLED_ARGS = {"reset", "no_spr", "replay_ratio", "exp_name"}


def method_label(args: Args) -> str:
    """The name reports group runs by: --exp-name, or bbf plus the variants and interventions."""
    if args.exp_name:
        return args.exp_name
    parts = ["bbf" if args.replay_ratio == 2 else f"bbf-rr{args.replay_ratio}", *args.reset]
    return "+".join(parts) + ("-nospr" if args.no_spr else "")


# NETWORK
def renormalize(x: torch.Tensor) -> torch.Tensor:
    """Min-max scale each sample's whole latent to [0, 1] (SPR / BBF)."""
    flat = x.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low + 1e-5)).view_as(x)


class SameMaxPool(nn.Module):
    """3x3 max-pool, stride 2, TensorFlow 'SAME' padding (84 -> 42 -> 21 -> 11): the extra padding
    row/column goes to the bottom/right, and padding never wins the max."""

    def __init__(self, in_size: int):
        super().__init__()
        total = max((math.ceil(in_size / 2) - 1) * 2 + 3 - in_size, 0)
        self.pads = (total // 2, total - total // 2) * 2  # fixed, so the network stays fx-traceable
        self.out_size = math.ceil(in_size / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.pad(x, self.pads, value=float("-inf")), 3, 2)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def impala_stage(in_channels: int, channels: int, in_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1), SameMaxPool(in_size), ResidualBlock(channels),
        ResidualBlock(channels),
    )  # fmt: skip


class TransitionModel(nn.Module):
    """Latent + one-hot action planes -> next latent (two 3x3 convs, ReLU, renormalized)."""

    def __init__(self, channels: int, num_actions: int):
        super().__init__()
        self.num_actions = num_actions
        self.conv1 = nn.Conv2d(channels + num_actions, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, latent: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        b, _, h, w = latent.shape
        planes = F.one_hot(actions, self.num_actions).to(latent.dtype)[:, :, None, None].expand(b, -1, h, w)
        x = F.relu(self.conv1(torch.cat([latent, planes], 1)))
        return renormalize(F.relu(self.conv2(x)))


class DuelingC51Head(nn.Module):
    def __init__(self, hidden: int, num_actions: int, num_atoms: int):
        super().__init__()
        self.num_actions, self.num_atoms = num_actions, num_atoms
        self.value = nn.Linear(hidden, num_atoms)
        self.advantage = nn.Linear(hidden, num_actions * num_atoms)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        value = self.value(h)[:, None, :]
        advantage = self.advantage(h).view(-1, self.num_actions, self.num_atoms)
        return value + advantage - advantage.mean(1, keepdim=True)  # logits (B, actions, atoms)


class BBFNetwork(nn.Module):
    """Submodule names are the reset groups: encoder, transition, projection, predictor, head."""

    def __init__(self, num_actions: int, width_scale: int = 4, hidden_dim: int = 2048, num_atoms: int = 51):
        super().__init__()
        c1, c2, c3 = 16 * width_scale, 32 * width_scale, 32 * width_scale
        self.encoder = nn.Sequential(
            impala_stage(4, c1, 84), impala_stage(c1, c2, 42), impala_stage(c2, c3, 21), nn.ReLU()
        )  # 84 -> 42 -> 21 -> 11
        self.transition = TransitionModel(c3, num_actions)
        # The projection has no activation of its own: the ReLU sits on the Q path only, and SPR's
        # targets and predictions use the raw projection (spr_networks.RainbowDQNNetwork).
        self.projection = nn.Linear(c3 * 11 * 11, hidden_dim)
        self.predictor = nn.Linear(hidden_dim, hidden_dim)
        self.head = DuelingC51Head(hidden_dim, num_actions, num_atoms)
        self.apply(xavier_uniform_zero_bias)  # the reference's init

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or float pixel stacks (B, 4, 84, 84) -> renormalized latent (B, C, 11, 11)."""
        # channels-last convolutions: 1.6x faster on a CPU (measured), and what GPU tensor cores want
        return renormalize(self.encoder((x / 255.0).contiguous(memory_format=torch.channels_last)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """C51 logits (B, actions, atoms)."""
        return self.q_logits(self.latent(x))

    def q_logits(self, latent: torch.Tensor) -> torch.Tensor:
        """The Q path: projection, ReLU, dueling C51 head."""
        return self.head(F.relu(self.projection(latent.flatten(1))))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Target side of SPR: the projection of the encoded state, without activation."""
        return self.projection(self.latent(x).flatten(1))

    def spr_predictions(self, latent: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Roll the latent forward through actions (B, K): predictions (B, K, hidden) of the
        projections of s_{t+1} .. s_{t+K}."""
        predictions = []
        for k in range(actions.shape[1]):
            latent = self.transition(latent, actions[:, k])
            predictions.append(self.predictor(self.projection(latent.flatten(1))))
        return torch.stack(predictions, 1)


def q_values(logits: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    return (logits.float().softmax(-1) * support).sum(-1)


# ALGO LOGIC
def project_distribution(
    returns: torch.Tensor, discounts: torch.Tensor, probabilities: torch.Tensor, support: torch.Tensor
) -> torch.Tensor:
    """C51's categorical projection of R + discount * z onto the support (dopamine's formulation):
    atom j receives p_i * max(0, 1 - |b_i - j|), b_i the clipped target's position in atom units."""
    v_min, v_max = support[0], support[-1]
    delta = support[1] - support[0]
    target = (returns[:, None] + discounts[:, None] * support[None, :]).clamp(v_min, v_max)
    position = (target - v_min) / delta  # (B, atoms_i)
    atoms = torch.arange(support.numel(), device=support.device, dtype=position.dtype)
    share = (1 - (position[:, :, None] - atoms[None, None, :]).abs()).clamp(min=0)  # (B, atoms_i, atoms_j)
    return (share * probabilities[:, :, None]).sum(1)


def spr_loss(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample: mean over the K steps of the squared distance between unit-normalized
    predictions and targets (summed over dims), zero past an episode boundary."""
    distance = (F.normalize(predictions.float(), dim=-1) - F.normalize(targets.float(), dim=-1)).pow(2).sum(-1)
    return (distance * mask).mean(1)


def annealed(step: int, period: int, start: float, end: float) -> float:
    """BBF's exponential_decay_scheduler: geometric interpolation from start to end over period."""
    frac = min(max(1.0 - step / period, 0.0), 1.0)
    return math.exp(frac * (math.log(start) - math.log(end)) + math.log(end))


def n_step_at(args: Args, cycle_step: int) -> int:
    """n anneals n_step_start -> n_step_end geometrically, rounded (BBF: round(10 * 0.3^frac))."""
    return int(
        round(annealed(cycle_step, args.anneal_steps, 1.0, args.n_step_end / args.n_step_start) * args.n_step_start)
    )


def gamma_at(args: Args, cycle_step: int) -> float:
    """1 - gamma anneals (1 - gamma_start) -> (1 - gamma_end) geometrically (BBF's reverse=True)."""
    return 1.0 - annealed(cycle_step, args.anneal_steps, 1.0 - args.gamma_start, 1.0 - args.gamma_end)


BBF_RESET_GROUPS = ("encoder", "transition", "projection", "predictor", "head")


def bbf_reset(args: Args, online: BBFNetwork, target: BBFNetwork, optimizer: torch.optim.Optimizer) -> ShrinkPerturb:
    """BBF's periodic reset as a Shrink & Perturb over both networks (each its own fresh draw):
    encoder and transition halfway to a fresh init, projection, predictor and head fully fresh;
    the optimizer state of every touched parameter is cleared. Applied by the loop on env steps."""
    keep, fresh = args.encoder_shrink, 1.0 - args.encoder_shrink
    groups = {"encoder": (keep, fresh), "transition": (keep, fresh), "projection": (0.0, 1.0),
              "predictor": (0.0, 1.0), "head": (0.0, 1.0)}  # fmt: skip
    return ShrinkPerturb([online, target], groups, every=0, optimizer=optimizer, init_fn=xavier_uniform_zero_bias)


class ResetSchedule:
    """When BBF resets, exactly as the reference's agent decides it (spr_agent.BBFAgent._train_step
    and reset_weights): with t the agent steps taken so far, a reset is considered when
    t > next_reset (first next_reset = interval); it sets next_reset = t + interval and is skipped
    when that lies beyond no_resets_after. In a 100k run at 20k steps: t = 20,001, 40,002, 60,003
    (three resets); at t = 80,004 the next one would fall after 100k, so none."""

    state_keys = ("next_reset", "resets_done")

    def __init__(self, interval: int, no_resets_after: int):
        self.interval, self.no_resets_after = interval, no_resets_after
        self.next_reset, self.resets_done = interval, 0

    def due(self, steps_taken: int) -> bool:
        if self.interval <= 0 or steps_taken <= self.next_reset:
            return False
        self.next_reset = steps_taken + self.interval
        if self.next_reset > self.no_resets_after:
            return False
        self.resets_done += 1
        return True

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in self.state_keys}

    def load_state_dict(self, state: dict) -> None:
        for key in self.state_keys:
            setattr(self, key, int(state[key]))


RESET_GRADIENT_STEPS = 40_000  # BBF.gin: 20k env steps at RR2; SR_SPR.gin: 5k env steps at RR8


def reset_interval(args: Args) -> int:
    """Agent steps between resets: --reset-every, or 40,000 gradient steps' worth at the replay
    ratio (20,000 at RR2 as in BBF.gin, 5,000 at RR8 as the reference's RR8 config sets it)."""
    return args.reset_every if args.reset_every is not None else RESET_GRADIENT_STEPS // args.replay_ratio


def build_learner(args: Args, num_actions: int, device: torch.device):
    online = BBFNetwork(num_actions, args.width_scale, args.hidden_dim, args.num_atoms)
    online = online.to(device, memory_format=torch.channels_last)
    target = copy.deepcopy(online)
    target.requires_grad_(False)
    decay = [p for p in online.parameters() if p.ndim > 1]
    no_decay = [p for p in online.parameters() if p.ndim <= 1]  # biases: BBF masks them out of the decay
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate, eps=args.adam_eps, fused=True,
    )  # fmt: skip
    return online, target, optimizer


def build_interventions(args: Args, online: BBFNetwork, target: BBFNetwork, optimizer, replay) -> Interventions:
    """Stepped after every optimizer step, in this order; the first is the EMA target."""
    every = args.ht_reset_every if "hare-tortoise" in args.reset else 0
    interventions = [HareTortoise(online, target, momentum=1.0 - args.tau, reset_every=every)]
    if "shrink-perturb" in args.reset:
        interventions.append(
            ShrinkPerturb(
                [online], {"": (args.sp_shrink, args.sp_perturb)}, args.sp_every, optimizer, xavier_uniform_zero_bias
            )
        )
    if "redo" in args.reset:
        batch_fn = lambda: replay.sample(args.redo_batch).states  # noqa: E731
        interventions.append(
            ReDo(
                online, optimizer, batch_fn, tau=args.redo_tau, every=args.redo_every, init_fn=xavier_uniform_zero_bias
            )
        )
    if "cbp" in args.reset:
        interventions.append(
            ContinualBackprop(online, optimizer, args.cbp_rate, args.cbp_decay, args.cbp_maturity,
                              init_fn=xavier_uniform_zero_bias)  # the network's own init
        )  # fmt: skip
    if "noise" in args.reset:
        interventions.append(GradientNoise(optimizer, args.noise_sigma, args.noise_decay))
    return Interventions(interventions)


def update(
    args: Args,
    online: BBFNetwork,
    target: BBFNetwork,
    optimizer: torch.optim.Optimizer,
    replay: PrioritizedFrameReplay,
    generator: torch.Generator,
    support: torch.Tensor,
    cycle_step: int,
) -> dict[str, torch.Tensor]:
    """One gradient step; returns device tensors (no host sync)."""
    batch = replay.sample(args.batch_size, n_step=n_step_at(args, cycle_step), gamma=gamma_at(args, cycle_step))
    b, k = batch.future_states.shape[:2]
    augment = (lambda x: drq_augment(x, generator)) if args.augment else (lambda x: x.float())
    states, next_states = augment(batch.states), augment(batch.next_states)
    use_spr = not args.no_spr and args.spr_weight > 0
    autocast = torch.autocast(states.device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    with torch.no_grad(), autocast:
        # double DQN: the online network picks the next action, the target's distribution backs it up
        next_action = q_values(online(next_states), support).argmax(1)
        next_probs = target(next_states).float().softmax(-1)[torch.arange(b), next_action]
        target_dist = project_distribution(batch.returns, batch.discounts, next_probs, support)
        if use_spr:
            future = augment(batch.future_states.flatten(0, 1))
            spr_targets = target.project(future).view(b, k, -1)
    with autocast:
        latent = online.latent(states)
        logits = online.q_logits(latent)
        if use_spr:
            predictions = online.spr_predictions(latent, batch.future_actions)
    chosen = logits.float()[torch.arange(b), batch.actions]
    c51_loss = -(target_dist * chosen.log_softmax(-1)).sum(-1)
    loss = c51_loss
    if use_spr:
        self_predictive = spr_loss(predictions, spr_targets, batch.future_mask)
        loss = loss + args.spr_weight * self_predictive
    loss = (batch.weights * loss).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    replay.update_priorities(batch.indices, torch.sqrt(c51_loss.detach() + 1e-10))
    out = {"loss": loss.detach(), "c51_loss": c51_loss.detach().mean()}
    if use_spr:
        out["spr_loss"] = self_predictive.detach().mean()
    return out


def main(args: Args) -> dict:
    problems = validate(args)
    if problems:
        sys.exit("bbf: invalid arguments:\n  " + "\n  ".join(problems))

    game = canonical_game(args.env_id)
    device = resolve_device(args.device)
    method = method_label(args)
    run_dir = Path(args.output_dir or Path("runs") / f"{game}__{method}__{args.seed}__{int(time.time())}")
    hold_run_folder(run_dir, "bbf")  # one writer per folder, released by the OS if this process dies
    config = asdict(args) | {"env_id": game, "device": str(device)}
    code_commit = git_commit(__file__)  # the code that runs, read now: HEAD may move while it runs
    checkpoint_path = run_dir / "checkpoint.pt"
    checkpoint = load_checkpoint(checkpoint_path, config, RESUMABLE_CHANGES, device, "bbf")
    start_step = checkpoint["step"] + 1 if checkpoint else 1
    if args.track:  # before the SummaryWriter, so that wandb syncs its scalars
        start_tracking(args.wandb_project_name, args.wandb_entity, run_dir, run_dir.name, config)
    writer = SummaryWriter(str(run_dir), purge_step=start_step) if args.track_tensorboard else None
    if writer and not checkpoint:
        writer.add_text("hyperparameters", hparams_markdown(config))
    print(f"bbf: {game} seed {args.seed} on {device} ({args.amp}), {args.total_steps} steps -> {run_dir}", flush=True)

    seed_everything(args.seed, args.deterministic)
    generator = device_generator(device, args.seed)
    env = make_atari100k_env(game, args.seed, max_episode_steps=args.max_episode_steps)
    num_actions = int(env.action_space.n)
    rng = np.random.default_rng(args.seed)
    support = torch.linspace(-args.v_max, args.v_max, args.num_atoms, device=device)

    online, target, optimizer = build_learner(args, num_actions, device)
    replay = PrioritizedFrameReplay(
        args.buffer_size, args.n_step_start, args.gamma_end, future_steps=args.spr_steps, device=device,
        generator=generator,
    )  # fmt: skip
    resets = bbf_reset(args, online, target, optimizer)
    reset_schedule = ResetSchedule(reset_interval(args), args.no_resets_after)
    interventions = build_interventions(args, online, target, optimizer, replay)
    probe = PlasticityProbe(online, probe_batch=None)

    def greedy_actions(observations: np.ndarray) -> np.ndarray:
        """BBF acts with the EMA target network, in training and evaluation."""
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            q = q_values(target(torch.as_tensor(observations, device=device)), support)
        return q.argmax(1).cpu().numpy()

    # TRAINING LOOP
    progress = Progress(args.total_steps, args.log_every, start=start_step - 1)
    episodes: list[dict] = []
    train_log: list[dict] = []
    diagnostics: list[dict] = []
    sums: dict[str, torch.Tensor] = {}  # losses summed on the device; read once per log interval
    updates_since_log, grad_steps, cycle_step, elapsed_before = 0, 0, 0, 0.0
    if checkpoint:
        online.load_state_dict(checkpoint["online"])
        target.load_state_dict(checkpoint["target"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        resets.load_state_dict(checkpoint["resets"])
        reset_schedule.load_state_dict(checkpoint["reset_schedule"])
        interventions.load_state_dict(checkpoint["interventions"])
        replay.load_state_dict(checkpoint["replay"])
        env.set_state(checkpoint["env"])
        obs = checkpoint["obs"]
        restore_random_states(checkpoint, rng, generator)
        episodes, train_log, diagnostics = checkpoint["episodes"], checkpoint["train_log"], checkpoint["diagnostics"]
        probe.initial, probe.probe_batch = checkpoint["probe_initial"], checkpoint["probe_batch"]
        sums = checkpoint["sums"]
        updates_since_log, grad_steps, cycle_step = checkpoint["counters"]
        elapsed_before = checkpoint["train_time_s"]
        print(f"bbf: resumed from {checkpoint_path} at step {checkpoint['step']}", flush=True)
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

        if step >= args.learning_starts and replay.num_sampleable > 0:
            for _ in range(args.replay_ratio):
                metrics = update(args, online, target, optimizer, replay, generator, support, cycle_step)
                interventions.step()
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0) + value
                updates_since_log += 1
                grad_steps += 1
                cycle_step += 1
        if reset_schedule.due(step - 1):  # step - 1 agent steps were taken before this one
            resets.apply()  # encoder/transition shrunk, projection/predictor/head fresh, both networks
            cycle_step = 0  # n-step and gamma anneal again
            if writer:
                writer.add_scalar("charts/resets", resets.resets, step)

        next_obs, reward, terminated, truncated, info = env.step(action)
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
            fields: dict = {"eps": epsilon, "episodes": len(episodes), "n": n_step_at(args, cycle_step),
                            "gamma": gamma_at(args, cycle_step)}  # fmt: skip
            if episodes:
                fields["return(last10)"] = float(np.mean([e["return"] for e in episodes[-10:]]))
            if updates_since_log:
                means = {key: value.item() / updates_since_log for key, value in sums.items()}
                stop_if_not_finite("bbf", means, step, checkpoint_path)
                train_log.append({"step": step, "grad_steps": grad_steps, **means})
                fields |= means
                if writer:
                    for key, value in means.items():
                        writer.add_scalar(f"losses/{key}", value, step)
                sums, updates_since_log = {}, 0
            if writer:
                writer.add_scalar("charts/SPS", rate, step)
                writer.add_scalar("charts/epsilon", epsilon, step)
                writer.add_scalar("charts/n_step", fields["n"], step)
                writer.add_scalar("charts/gamma", fields["gamma"], step)
                for key, value in (interventions.metrics() | {"bbf_resets/resets": resets.resets}).items():
                    writer.add_scalar(f"interventions/{key}", value, step)  # what each one has done
            progress.report(step, rate, **fields)

        if args.diag_every and step % args.diag_every == 0 and replay.num_sampleable > 0:
            if probe.probe_batch is None:
                probe.probe_batch = replay.sample(args.diag_batch).states
            values = probe.measure()
            diagnostics.append({"step": step, **values})
            if writer:
                for key, value in values.items():
                    writer.add_scalar(f"plasticity/{key}", value, step)

        if args.checkpoint_every and step % args.checkpoint_every == 0 and step < args.total_steps:
            # never replace the last good checkpoint by a diverged one (one read per checkpoint)
            stop_if_not_finite("bbf", {key: value.item() for key, value in sums.items()}, step, checkpoint_path)
            save_checkpoint(
                checkpoint_path,
                {
                    "step": step, "config": config, "online": online.state_dict(), "target": target.state_dict(),
                    "optimizer": optimizer.state_dict(), "resets": resets.state_dict(),
                    "reset_schedule": reset_schedule.state_dict(),
                    "interventions": interventions.state_dict(),
                    "replay": replay.state_dict(), "env": env.get_state(), "obs": obs,
                    **random_states(rng, generator, device),
                    "episodes": episodes, "train_log": train_log, "diagnostics": diagnostics,
                    "probe_initial": probe.initial, "probe_batch": probe.probe_batch, "sums": sums,
                    "counters": (updates_since_log, grad_steps, cycle_step),
                    "train_time_s": elapsed_before + time.time() - start_time,
                }, "bbf"
            )  # fmt: skip
    train_time = elapsed_before + time.time() - start_time

    # FINAL EVALUATION
    print(f"bbf: evaluating {args.eval_episodes} episodes (epsilon {args.eval_epsilon})", flush=True)
    online.eval(), target.eval()
    evaluation = evaluate_episodes(
        lambda seed: make_atari100k_env(game, seed, max_episode_steps=args.max_episode_steps),
        greedy_actions,
        num_episodes=args.eval_episodes,
        num_envs=args.eval_envs,
        epsilon=args.eval_epsilon,
        seed=args.seed + 10_000,  # eval episodes never replay the training seed's starts
    )
    results = {
        "agent": "bbf",
        "method": method,
        "game": game,
        "seed": args.seed,
        "total_steps": args.total_steps,
        "grad_steps": grad_steps,
        "resets": resets.resets,
        "eval_episodes": len(evaluation.returns),
        "eval_returns": evaluation.returns,
        "eval_lengths": evaluation.lengths,
        "eval_mean": evaluation.mean,
        "train_episodes": episodes,
        "train_log": train_log,
        "diagnostics": diagnostics,
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
    print(f"bbf: eval mean {evaluation.mean} over {len(evaluation.returns)} episodes -> {run_dir / 'results.json'}")
    env.close()
    return results


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main(tyro.cli(Args))
