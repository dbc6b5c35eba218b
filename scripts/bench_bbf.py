"""BBF's gradient steps per second on the current device, fp32 and bf16, and what they mean for
one 100k-step run.

    python scripts/bench_bbf.py                      # auto device, full-size network
    python scripts/bench_bbf.py --device cuda --updates 200
    python scripts/bench_bbf.py --width-scale 1 --hidden-dim 256    # the small CPU smoke network

A full-size BBF update takes about 2 s on a 2-core CPU, so the defaults time a handful there.
Projected run = env steps at the measured env rate + (total - learning_starts) * replay_ratio
gradient steps at the measured update rate (+ the 100-episode evaluation, not counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from rlplastic.envs.atari import canonical_game, make_atari100k_env

from rlplastic.agent_files import load_agent
from rlplastic.bench import device_name, random_replay, time_env_steps, time_steps
from rlplastic.cli import replace_flags
from rlplastic.cuda_graphs import CapturedStep, graph_capture_available
from rlplastic.interventions import build_interventions
from rlplastic.machine import device_generator, resolve_device
from rlplastic.replay import PrioritizedFrameReplay

bbf = load_agent("bbf")


@dataclass
class BenchArgs:
    env_id: str = "Breakout"
    """game whose action count and env speed are used"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """device of the networks and replay"""
    updates: int = 0
    """timed gradient steps per precision; 0 = 3 on a CPU, 100 on a GPU"""
    width_scale: int = 4
    """Impala width (BBF: 4)"""
    hidden_dim: int = 2048
    """projection width (BBF: 2048)"""
    replay_ratio: int = 2
    """gradient steps per env step of the projected run (BBF: 2, RR8: 8)"""
    env_steps: int = 2_000
    """steps for the env-speed measurement"""


def time_updates(args: bbf.Args, device: torch.device, num_actions: int, updates: int, graph: bool = False) -> float:
    """Seconds per gradient step (n = n_step_start, the EMA target update included); graph=True:
    the step captured in a CUDA graph as the agent runs it on CUDA."""
    generator = device_generator(device, 0)
    replay = PrioritizedFrameReplay(
        10_000, args.n_step_start, args.gamma_end, future_steps=args.spr_steps, device=device, generator=generator
    )
    random_replay(replay, num_actions)
    online, target, optimizer = bbf.build_learner(args, num_actions, device)
    sample_states = lambda n: replay.sample(n).states  # noqa: E731
    interventions = build_interventions(args.interventions, online, target, optimizer, sample_states)
    support = torch.linspace(-args.v_max, args.v_max, args.num_atoms, device=device)

    gamma = torch.full((), args.gamma_start, device=device) if graph else args.gamma_start

    def device_work() -> torch.Tensor:
        out = bbf.update(args, online, target, optimizer, replay, generator, support, args.n_step_start, gamma)
        interventions.device_step()  # the EMA target update is part of every BBF gradient step
        return out["loss"]

    captured = CapturedStep(device_work, generators=[generator]) if graph else device_work

    def step() -> torch.Tensor:
        loss = captured()
        interventions.host_step()
        return loss

    # warm-up: allocator, kernels, optimizer state (and the capture)
    return time_steps(step, updates, device, warmup=2 if device.type == "cpu" else 10)


def main(bench: BenchArgs) -> None:
    game = canonical_game(bench.env_id)
    device = resolve_device(bench.device)
    name = device_name(device)
    updates = bench.updates or (3 if device.type == "cpu" else 100)
    num_actions = int(make_atari100k_env(game, seed=0).action_space.n)
    print(f"bench_bbf: {game} on {device} ({name}), torch {torch.__version__}, width {bench.width_scale}, "
          f"hidden {bench.hidden_dim}, {updates} timed updates per precision")  # fmt: skip
    env_time = time_env_steps(game, bench.env_steps)
    print(f"env steps/s alone: {1 / env_time:.1f}")
    args = replace_flags(bbf.Args(), env_id=game, device=bench.device, width_scale=bench.width_scale,
                         hidden_dim=bench.hidden_dim, replay_ratio=bench.replay_ratio)  # fmt: skip
    params = sum(p.numel() for p in bbf.BBFNetwork(num_actions, args.width_scale, args.hidden_dim).parameters())
    print(f"network: {params / 1e6:.1f} M parameters")
    grad_steps = (args.total_steps - args.learning_starts + 1) * args.replay_ratio
    modes = ["eager", "cuda-graph"] if graph_capture_available(device) else ["eager"]
    for mode in modes:
        for amp in ("fp32", "bf16"):
            args.amp = amp
            seconds = time_updates(args, device, num_actions, updates, graph=mode == "cuda-graph")
            projected = args.total_steps * env_time + grad_steps * seconds
            print(f"{amp} {mode}: {1 / seconds:8.2f} updates/s ({seconds * 1000:.1f} ms each); projected 100k-step "
                  f"run at replay ratio {args.replay_ratio} ({grad_steps:,} updates): {projected / 3600:.2f} h "
                  f"({projected / 60:.0f} min)")  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
