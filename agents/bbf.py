"""BBF ("Bigger, Better, Faster", Schwarzer et al. 2023) on Atari-100k, in one file.

Hyperparameters of the reference code (google-research bigger_better_faster: bbf/configs/BBF.gin,
agents/spr_agent.py, spr_networks.py): Impala-CNN width 4, C51 with a dueling head, SPR,
prioritized replay, n-step 10 -> 3 and gamma 0.97 -> 0.997 annealed after every reset, EMA target
(tau 0.005) for backups, SPR targets and acting, AdamW with weight decay, and resets: encoder and
transition model shrunk halfway toward a fresh init, projection, predictor and head re-initialized,
for the online and the target network alike: three times in a 100k run by the 2024 reference code
(after 20,001, 40,002 and 60,003 agent steps), four by its 2023 code (20k ... 80k), whose rule the
bbf-rr2 / bbf-rr8 presets take to compare with the published score files (ResetSchedule).

    python agents/bbf.py --env-id Breakout                  # BBF.gin: replay ratio 2, resets every 20k steps
    python agents/bbf.py bbf-rr8 --env-id Pong              # RR8: resets every 5k steps (40k gradient steps)
    python agents/bbf.py hare-tortoise --env-id Pong        # Hare & Tortoise's BBF: --reset hare-tortoise --no-spr
    python agents/bbf.py cpu-smoke                          # width 1, 3,000 steps: minutes on a CPU

Published numbers: bbf-rr2 with the authors' RR2 per-run scores (scores/RR2_BBF.csv, IQM about 0.89),
bbf-rr8 with the paper's BBF (IQM 1.045, RR8_BBF.csv).

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
- the reset interval (--bbf-reset-every, agent steps) defaults to 40,000 gradient steps' worth at
  the chosen replay ratio (20k at RR2 as BBF.gin, 5k at RR8 as the reference's RR8 configuration);
- --amp bf16 runs the forward passes under torch.autocast in bfloat16 (the reference's half
  precision is float16 with loss scaling); losses are computed in float32.

Resets are one rlplastic.interventions.ShrinkPerturb over both networks; the EMA target (--ema 0.995,
tau 0.005) is updated in `update` after the optimizer step. The interventions' and the run's flags are
DrQ's. On CUDA the gradient step is replayed from CUDA graphs (--cuda-graph).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from rlplastic.envs.atari import clip_reward

from rlplastic.augment import drq_augment
from rlplastic.cli import cli_with_presets
from rlplastic.cuda_graphs import CapturedSteps, graph_capture_available
from rlplastic.diagnostics import PlasticityProbe
from rlplastic.init import xavier_uniform_zero_bias
from rlplastic.interventions import InterventionOptions, ShrinkPerturb, build_interventions, ema_target
from rlplastic.replay import PrioritizedFrameReplay
from rlplastic.runs import Run, RunOptions, interruptible, run_problems
from rlplastic.schedules import LinearEpsilon, ResetSchedule, annealed

FLAT = tyro.conf.arg(name="")  # a nested dataclass whose flags stay flat: --reset, not --interventions.reset
SUPPORTED = ("hare-tortoise", "shrink-perturb", "redo", "cbp", "noise")  # BBF's resets already renew its head


@dataclass
class Args:
    env_id: str = "Breakout"
    """Atari-100k game: a name such as Pong or MsPacman, or an ALE id such as ALE/Pong-v5"""
    seed: int = 1
    """seed of the environment, the networks, replay sampling and augmentation"""
    total_steps: int = 100_000
    """agent steps of interaction (100k = 400k frames, the Atari-100k budget)"""
    amp: Literal["fp32", "bf16"] = "fp32"
    """precision of the forward passes: bf16 autocast (about 2x throughput on recent GPUs)"""
    cuda_graph: bool = True
    """on CUDA, capture the whole gradient step in CUDA graphs (one per annealed n); ignored on the CPU"""

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
    learning_starts: int = 2_000
    """agent steps of random play before the first update"""
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
    bbf_reset_every: int | None = None
    """agent steps between BBF's own resets; default 40,000 gradient steps' worth: 20,000 at replay
    ratio 2 (BBF.gin), 5,000 at 8; 0 = no resets"""
    no_resets_after: int = 100_000
    """a reset is skipped when the next one would come after this agent step"""
    reset_rule: Literal["2024", "2023"] = "2024"
    """which reference code decides a reset is due: 2024, t > next_reset (3 resets in 100k at RR2, 18 at
    RR8); 2023, t >= next_reset, the code of the published score files (4 at RR2, 19 at RR8)"""
    encoder_shrink: float = 0.5
    """BBF reset: encoder and transition model <- shrink * theta + (1 - shrink) * fresh init"""

    # The EMA target (--ema 0.995, the reference's tau 0.005) and interventions on top of BBF
    interventions: Annotated[InterventionOptions, FLAT] = field(default_factory=lambda: InterventionOptions(ema=0.995))
    run: Annotated[RunOptions, FLAT] = field(default_factory=RunOptions)


def _hare_tortoise() -> InterventionOptions:
    return InterventionOptions(reset=("hare-tortoise",), ema=0.995)


PRESETS = {
    # the published per-run score files came from the 2023 code, whose reset rule the presets follow
    "bbf-rr2": ("BBF as BBF.gin: replay ratio 2, resets every 20k steps, the 2023 reset rule (scores/RR2_BBF.csv)",
                Args(reset_rule="2023")),
    "bbf-rr8": ("the paper's headline BBF: replay ratio 8, resets every 5k steps, the 2023 reset rule "
                "(scores/RR8_BBF.csv)", Args(replay_ratio=8, reset_rule="2023")),
    "hare-tortoise": ("Hare & Tortoise's BBF (Lee et al. 2024, section 5): BBF's resets, hare <- tortoise every "
                      "4,000 gradient steps, no SPR", Args(no_spr=True, interventions=_hare_tortoise())),
    "cpu-smoke": ("minutes on a CPU: width 1, hidden 256, 3,000 steps, a 10-episode evaluation",
                  Args(env_id="Pong", width_scale=1, hidden_dim=256, total_steps=3_000,
                       run=RunOptions(eval_episodes=10, eval_envs=5, device="cpu"))),
}  # fmt: skip


def validate(args: Args) -> list[str]:
    """Every problem with the arguments, each naming the value and what is allowed."""
    problems = run_problems(args)  # --env-id, --total-steps and the run's options
    for name in ("replay_ratio", "width_scale", "hidden_dim", "anneal_steps", "spr_steps"):
        if getattr(args, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a positive integer")
    if args.bbf_reset_every is not None and args.bbf_reset_every < 0:
        problems.append(f"--bbf-reset-every {args.bbf_reset_every}: must be >= 0 (0 = no resets)")
    for name in ("learning_starts", "epsilon_decay_steps", "no_resets_after"):
        if getattr(args, name) < 0:
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 0")
    if args.num_atoms < 2 or not args.v_max > 0:
        problems.append(f"--num-atoms {args.num_atoms} / --v-max {args.v_max}: need >= 2 atoms and v_max > 0")
    if not 1 <= args.n_step_end <= args.n_step_start:
        problems.append(f"--n-step-start {args.n_step_start} / --n-step-end {args.n_step_end}: need 1 <= end <= start")
    if args.spr_steps > args.n_step_start:
        problems.append(f"--spr-steps {args.spr_steps}: must be <= --n-step-start {args.n_step_start}")
    if not (0 < args.gamma_start < 1 and 0 < args.gamma_end < 1):
        problems.append(f"--gamma-start {args.gamma_start} / --gamma-end {args.gamma_end}: must lie in (0, 1)")
    if args.learning_starts > args.total_steps:
        problems.append(f"--learning-starts {args.learning_starts}: must be <= --total-steps {args.total_steps}")
    for name in ("epsilon_final", "encoder_shrink"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must lie in [0, 1]")
    if not args.learning_rate > 0 or not args.adam_eps > 0 or args.weight_decay < 0 or args.spr_weight < 0:
        problems.append(f"--learning-rate {args.learning_rate} / --adam-eps {args.adam_eps} / --weight-decay "
                        f"{args.weight_decay} / --spr-weight {args.spr_weight}: need > 0, > 0, >= 0, >= 0")  # fmt: skip
    if args.amp == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        problems.append("--amp bf16: this GPU does not support bfloat16; use --amp fp32")
    n_step = max(args.n_step_start, 0)
    problems += PrioritizedFrameReplay.problems(args.buffer_size, args.batch_size, n_step, args.run.device, True)
    return problems + args.interventions.problems("bbf", SUPPORTED, needs_ema=True)


# The arguments the default method label shows; a sweep adds key=value for any other it varies.
LABELLED_ARGS = {"reset", "continual", "no_spr", "replay_ratio", "exp_name"}


def method_label(args: Args) -> str:
    """The name reports group runs by: --exp-name, or bbf plus the variants and interventions."""
    if args.run.exp_name:
        return args.run.exp_name
    parts = ["bbf" if args.replay_ratio == 2 else f"bbf-rr{args.replay_ratio}", *args.interventions.chosen]
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


def n_step_at(args: Args, cycle_step: int) -> int:
    """n anneals n_step_start -> n_step_end geometrically, rounded (BBF: round(10 * 0.3^frac))."""
    fraction = annealed(cycle_step, args.anneal_steps, 1.0, args.n_step_end / args.n_step_start)
    return int(round(fraction * args.n_step_start))


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


RESET_GRADIENT_STEPS = 40_000  # BBF.gin: 20k env steps at RR2; SR_SPR.gin: 5k env steps at RR8


def reset_interval(args: Args) -> int:
    """Agent steps between resets: --bbf-reset-every, or 40,000 gradient steps' worth at the replay
    ratio (20,000 at RR2 as in BBF.gin, 5,000 at RR8 as the reference's RR8 config sets it)."""
    return args.bbf_reset_every if args.bbf_reset_every is not None else RESET_GRADIENT_STEPS // args.replay_ratio


def build_learner(args: Args, num_actions: int, device: torch.device):
    """Online network, its EMA target, AdamW (capturable when the update may be graph-captured)."""
    online = BBFNetwork(num_actions, args.width_scale, args.hidden_dim, args.num_atoms)
    online = online.to(device, memory_format=torch.channels_last)
    target = ema_target(online)
    decay = [p for p in online.parameters() if p.ndim > 1]
    no_decay = [p for p in online.parameters() if p.ndim <= 1]  # biases: BBF masks them out of the decay
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate, eps=args.adam_eps, fused=True, capturable=args.cuda_graph and device.type == "cuda",
    )  # fmt: skip
    return online, target, optimizer


def update(args: Args, online: BBFNetwork, target: BBFNetwork, optimizer: torch.optim.Optimizer,
           replay: PrioritizedFrameReplay, generator: torch.Generator, support: torch.Tensor, n_step: int,
           gamma: float | torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
    """One gradient step with the annealed n and gamma (a float, or a device scalar that a
    captured step reads); returns device tensors (no host sync)."""
    batch = replay.sample(args.batch_size, n_step=n_step, gamma=gamma)
    b, k = batch.future_states.shape[:2]
    augment = (lambda x: drq_augment(x, generator)) if args.augment else (lambda x: x.float())
    states, next_states = augment(batch.states), augment(batch.next_states)
    use_spr = not args.no_spr and args.spr_weight > 0
    autocast = torch.autocast(states.device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    with torch.no_grad(), autocast:
        # double DQN: the online network picks the next action, the target's distribution backs it up
        next_action = q_values(online(next_states), support).argmax(1)
        next_probs = target(next_states).float().softmax(-1)[torch.arange(b, device=states.device), next_action]
        target_dist = project_distribution(batch.returns, batch.discounts, next_probs, support)
        if use_spr:
            future = augment(batch.future_states.flatten(0, 1))
            spr_targets = target.project(future).view(b, k, -1)
    with autocast:
        latent = online.latent(states)
        logits = online.q_logits(latent)
        if use_spr:
            predictions = online.spr_predictions(latent, batch.future_actions)
    chosen = logits.float()[torch.arange(b, device=states.device), batch.actions]
    c51_loss = -(target_dist * chosen.log_softmax(-1)).sum(-1)
    loss = c51_loss
    if use_spr:
        self_predictive = spr_loss(predictions, spr_targets, batch.future_mask)
        loss = loss + args.spr_weight * self_predictive
    loss = (batch.weights * loss).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():  # the EMA target (tau = 1 - ema = 0.005): backups, SPR targets and acting
        torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1.0 - args.interventions.ema)
    replay.update_priorities(batch.indices, torch.sqrt(c51_loss.detach() + 1e-10))
    out = {"loss": loss.detach(), "c51_loss": c51_loss.detach().mean()}
    if use_spr:
        out["spr_loss"] = self_predictive.detach().mean()
    return out


def main(args: Args) -> dict:
    # the run: its folder, logs, checkpoints, results and random streams; exits on invalid arguments
    run = Run("bbf", args, validate(args), method_label(args), __file__)
    device, generator, env = run.device, run.generator, run.make_env()
    support = torch.linspace(-args.v_max, args.v_max, args.num_atoms, device=device)
    num_actions = int(env.action_space.n)
    online, target, optimizer = build_learner(args, num_actions, device)
    replay = PrioritizedFrameReplay(args.buffer_size, args.n_step_start, args.gamma_end, future_steps=args.spr_steps,
                                    device=device, generator=generator)  # fmt: skip
    resets = bbf_reset(args, online, target, optimizer)
    reset_schedule = ResetSchedule(reset_interval(args), args.no_resets_after, args.reset_rule)
    sample_states = lambda n: replay.sample(n).states  # noqa: E731
    interventions = build_interventions(args.interventions, online, target, optimizer, sample_states,
                                        xavier_uniform_zero_bias, agent_keeps_ema=True)  # fmt: skip
    probe = PlasticityProbe(online, probe_batch=None)
    run.keep(online=online, target=target, optimizer=optimizer, resets=resets, reset_schedule=reset_schedule,
             interventions=interventions, replay=replay, probe=probe)  # fmt: skip
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")  # noqa: E731

    def greedy_actions(observations: np.ndarray) -> np.ndarray:
        """BBF acts with the EMA target network, in training and evaluation."""
        with torch.no_grad(), autocast():
            q = q_values(target(torch.as_tensor(observations, device=device)), support)
        return q.argmax(1).cpu().numpy()

    def train_step(n_step: int, gamma: float | torch.Tensor) -> None:  # what a CUDA graph captures
        run.losses.add(update(args, online, target, optimizer, replay, generator, support, n_step, gamma))
        interventions.device_step()

    use_graph = args.cuda_graph and graph_capture_available(device) and interventions.graph_safe
    gamma_now = torch.zeros((), device=device)  # the captured steps read the annealed gamma here
    captured = CapturedSteps(lambda n: train_step(n, gamma_now), generators=[generator])  # a graph per n

    def gradient_step(cycle_step: int) -> None:
        n_step, gamma = n_step_at(args, cycle_step), gamma_at(args, cycle_step)
        if use_graph:
            gamma_now.fill_(gamma)
            return captured(n_step)
        train_step(n_step, gamma)

    update_mode = "cuda-graph" if use_graph else "eager"
    print(f"bbf: update {update_mode}", flush=True)

    # TRAINING LOOP
    explore = LinearEpsilon(args.learning_starts, args.epsilon_decay_steps, args.epsilon_final)  # dopamine's
    saved = run.resume()
    obs, (grad_steps, cycle_step) = (saved["obs"], saved["counters"]) if saved else (env.reset()[0], (0, 0))
    for step in run.steps():
        epsilon = explore(step - 1)  # step - 1 agent steps taken so far
        if run.rng.random() < epsilon:  # epsilon-greedy, from the run's acting stream
            action = int(run.rng.integers(num_actions))
        else:
            action = int(greedy_actions(obs[None])[0])  # the loop's one host sync

        if step >= args.learning_starts and replay.num_sampleable > 0:
            for _ in range(args.replay_ratio):
                gradient_step(cycle_step)  # the update and the interventions' device work: one replay on CUDA
                interventions.host_step()  # schedules and rare events, outside the graph
                run.losses.tick()
                grad_steps += 1
                cycle_step += 1
        if reset_schedule.due(step - 1):  # step - 1 agent steps were taken before this one
            resets.apply()  # encoder/transition shrunk, projection/predictor/head fresh, both networks
            cycle_step = 0  # n-step and gamma anneal again
            run.log({"charts/resets": resets.resets}, step)

        next_obs, reward, terminated, truncated, info = env.step(action)
        # a life loss is a terminal for learning, yet the game goes on (dopamine's terminal_on_life_loss)
        replay.add(obs[-1], action, clip_reward(reward), terminated or info["life_loss"], truncated)
        if terminated or truncated:
            run.episode(step, info)
            next_obs, _ = env.reset()
        obs = next_obs
        if run.report_due(step):
            charts = {"epsilon": epsilon, "n_step": n_step_at(args, cycle_step), "gamma": gamma_at(args, cycle_step)}
            activity = interventions.metrics() | {"bbf_resets/resets": resets.resets}
            run.report(step, charts, activity, grad_steps=grad_steps)
        run.diagnose(step, probe, sample_states, ready=replay.num_sampleable > 0)
        run.evaluate_if_due(step, greedy_actions, [online, target])
        run.checkpoint(step, obs=obs, counters=(grad_steps, cycle_step))

    results = {"grad_steps": grad_steps, "resets": resets.resets, "reset_rule": args.reset_rule,
               "update_mode": update_mode}  # fmt: skip
    return run.finish(greedy_actions, [online, target], results, models={"target": target})


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    with interruptible("bbf"):  # Ctrl-C / SIGTERM: one line per run, the checkpoint kept
        main(cli_with_presets(Args, PRESETS, __doc__))
