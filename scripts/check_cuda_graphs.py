"""Does a CUDA-graph-captured update compute what the eager one computes? A GPU check (CI has no GPU).

    python scripts/check_cuda_graphs.py            # needs CUDA; prints one line per case
    python scripts/check_cuda_graphs.py --device cpu --steps 4   # a dry run of the script: no graphs

For each case two learners are built from one seed; one takes `steps` eager updates, the other
the same updates through rlplastic.cuda_graphs.CapturedStep (3 eager warm-up calls, the capture,
then replays), with the interventions' host_step() after each as the agents run them. Randomness
is taken out so the two must agree: augmentation off and a replay with a single sampleable
transition (sampling it is certain). Printed: the largest parameter difference and loss difference
after `steps` updates; a case passes within a float tolerance. Then, with augmentation and the full
replay back on, the loss differences say whether the graph's random streams follow the eager ones
(informational: the captured run is one valid seeded run either way).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import tyro

from rlplastic.agent_files import load_agent, load_script
from rlplastic.batched import StackedModules
from rlplastic.bench import random_replay
from rlplastic.cli import replace_flags
from rlplastic.cuda_graphs import CapturedStep, ConcurrentSteps, graph_capture_available
from rlplastic.init import xavier_uniform_zero_bias
from rlplastic.interventions import build_interventions
from rlplastic.replay import FrameReplay, PrioritizedFrameReplay, StackedFrameReplays

drq, drq_batched, bbf = load_agent("drq"), load_script("drq_batched"), load_agent("bbf")
DEVICE = torch.device("cuda")  # --device cpu: a dry run of this script, both learners eager


@dataclass
class CheckArgs:
    steps: int = 12
    """updates per learner (the first 3 are eager warm-up calls in the captured one)"""
    tolerance: float = 1e-3
    """largest parameter difference allowed (float32 reductions may differ in order)"""
    device: str = "cuda"
    """cuda; cpu runs both learners eagerly, to check the script itself"""
    bbf_width_scale: int = 4
    """BBF's Impala width (4 = full size; 1 for a quick dry run)"""
    only: tuple[str, ...] = ()
    """run only the cases whose name contains one of these texts (e.g. "backprop" "concurrent"); all by default"""


def single_slot(replay: FrameReplay, slot: int = 500) -> FrameReplay:
    """Only `slot` is sampleable: sampling it is certain, so eager and captured updates must agree."""
    replay.sampleable.zero_()
    replay.sampleable[slot] = 1.0
    if isinstance(replay, PrioritizedFrameReplay):
        replay.priorities.fill_(1.0)
    return replay


def drq_case(overrides: dict, runs: int = 1, deterministic: bool = True, actions: tuple[int, ...] = ()):
    """A builder: (seed, graph) -> (device work, host steps, parameters, generator) of a DrQ learner
    (or of a batch of `runs`, of 4 actions each or of `actions`: heads padded in one stack)."""

    def build(seed: int, graph: bool):
        torch.manual_seed(seed)
        args = replace_flags(drq.Args(), device=DEVICE.type, augment=not deterministic, cuda_graph=graph, **overrides)
        generator = torch.Generator(DEVICE).manual_seed(seed)
        learners, items = [], []
        nets = [drq.QNetwork(a).to(DEVICE) for a in actions or (4,) * runs]
        stack = StackedModules(nets) if runs > 1 else None
        replays = StackedFrameReplays(runs, 2_000, args.n_step, args.gamma, device=DEVICE,
                                      generators=[generator] * runs)  # fmt: skip
        for q, replay in zip(nets, replays.replays, strict=True):
            replay = random_replay(replay, min(actions or (4,)))
            replay = single_slot(replay) if deterministic else replay
            q, target, optimizer = drq.build_learner(args, 0, DEVICE, q)
            learners.append((q, target, optimizer))
            ema = None if target is q else target
            items.append(build_interventions(args.interventions, q, ema, optimizer,
                                             lambda n, r=replay: r.sample(n).states, xavier_uniform_zero_bias,
                                             drq.HEAD_MODULES))  # fmt: skip
        targets = StackedModules([t for _, t, _ in learners]) if runs > 1 and args.interventions.ema > 0 else None
        valid = drq_batched.action_mask(stack) if runs > 1 else None

        def device_work() -> torch.Tensor:
            if runs == 1:
                loss = drq.update(args, *learners[0], replays[0], generator)["td_loss"]
            else:
                loss = drq_batched.batched_update(args, stack, targets, [o for _, _, o in learners], replays,
                                          [generator] * runs, valid)["td_loss"].sum()  # fmt: skip
            for run_items in items:
                run_items.device_step()
            return loss

        return device_work, [i.host_step for i in items], [p for q in nets for p in q.parameters()], generator

    return build


def bbf_case(width_scale: int, deterministic: bool = True):
    def build(seed: int, graph: bool):
        torch.manual_seed(seed)
        args = replace_flags(bbf.Args(), device=DEVICE.type, augment=not deterministic, cuda_graph=graph,
                             width_scale=width_scale, hidden_dim=512 * width_scale)  # fmt: skip
        generator = torch.Generator(DEVICE).manual_seed(seed)
        replay = random_replay(PrioritizedFrameReplay(2_000, 10, 0.997, future_steps=5, device=DEVICE,
                                                      generator=generator), 4)  # fmt: skip
        replay = single_slot(replay) if deterministic else replay
        online, target, optimizer = bbf.build_learner(args, 4, DEVICE)
        items = build_interventions(args.interventions, online, target, optimizer, lambda n: replay.sample(n).states)
        support = torch.linspace(-10, 10, 51, device=DEVICE)
        gamma = torch.full((), 0.97, device=DEVICE) if graph else 0.97

        def device_work() -> torch.Tensor:
            loss = bbf.update(args, online, target, optimizer, replay, generator, support, 10, gamma)["loss"]
            items.device_step()
            return loss

        return device_work, [items.host_step], list(online.parameters()), generator

    return build


def compare(build: Callable, steps: int) -> tuple[float, float]:
    """Largest parameter and loss differences between the eager and the captured learner."""
    results = []
    for graph in (False, True):
        device_work, host_steps, params, generator = build(0, graph)
        capture = graph and DEVICE.type == "cuda"
        step = CapturedStep(device_work, generators=[generator]) if capture else device_work
        losses = []
        for _ in range(steps):
            losses.append(step().clone())
            for host_step in host_steps:
                host_step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        results.append(([p.detach().clone() for p in params], torch.stack(losses)))
    (eager_params, eager_losses), (graph_params, graph_losses) = results
    param_diff = max((a - b).abs().max().item() for a, b in zip(eager_params, graph_params, strict=True))
    return param_diff, (eager_losses - graph_losses).abs().max().item()


def compare_concurrent(runs: int, steps: int) -> float:
    """Largest parameter difference between `runs` DrQ learners stepped eagerly one after another
    and the same learners each captured in its own graph, replayed side by side on streams
    (agents/drq.py --batched-update concurrent)."""
    results = []
    for graph in (False, True):
        builds = [drq_case({})(seed, graph) for seed in range(runs)]
        concurrent = ConcurrentSteps(
            [b[0] for b in builds], [b[3] for b in builds], capture=graph and DEVICE.type == "cuda"
        )
        for _ in range(steps):
            concurrent()
            for build in builds:
                for host_step in build[1]:
                    host_step()
        results.append([p.detach().clone() for build in builds for p in build[2]])
    return max((a - b).abs().max().item() for a, b in zip(*results, strict=True))


def main(check: CheckArgs) -> None:
    global DEVICE
    DEVICE = torch.device(check.device)
    if DEVICE.type == "cuda" and not graph_capture_available(DEVICE):
        sys.exit("check_cuda_graphs: needs a CUDA device with graph-safe generators")
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (dry run: no graphs)"
    print(f"check_cuda_graphs: {name}, torch {torch.__version__}, {check.steps} updates")
    cases = {
        "drq": drq_case({}),
        "drq + hare-tortoise (EMA 0.995, reset every 5)": drq_case({"ema": 0.995, "reset": ("hare-tortoise",),
                                                                   "ht_every": 5}),
        "drq + head reset every 5": drq_case({"reset": ("head",), "head_every": 5}),
        "drq + continual backprop (rate 0.01, maturity 2)": drq_case({"continual": ("cbp",), "cbp_rate": 0.01,
                                                                     "cbp_maturity": 2}),
        "drq + lifecycle (lifespan 3-6, recovery 2-3)": drq_case({"continual": ("lifecycle",),
                                                                 "lifecycle_lifespan": (3, 6),
                                                                 "lifecycle_recovery": (2, 3)}),
        "drq batched, 4 runs": drq_case({}, runs=4),
        "drq batched, 4 runs + EMA and head reset every 5": drq_case({"ema": 0.995, "reset": ("head",),
                                                                     "head_every": 5}, runs=4),
        "drq batched, 4 runs of 3 / 4 / 6 / 18 actions in one stack": drq_case({}, runs=4, actions=(3, 4, 6, 18)),
        f"bbf (width {check.bbf_width_scale}, n 10, SPR, EMA)": bbf_case(check.bbf_width_scale),
    }  # fmt: skip

    def wanted(name: str) -> bool:
        return not check.only or any(text in name for text in check.only)

    failed = []
    for name, build in cases.items():
        if not wanted(name):
            continue
        try:
            param_diff, loss_diff = compare(build, check.steps)
        except Exception as error:  # report and go on: one broken case must not hide the others
            print(f"FAIL  {name}: {type(error).__name__}: {error}")
            failed.append(name)
            continue
        ok = param_diff <= check.tolerance
        failed += [] if ok else [name]
        print(f"{'ok  ' if ok else 'FAIL'}  {name}: max |param diff| {param_diff:.2e}, max |loss diff| {loss_diff:.2e}")
    if wanted("drq concurrent"):
        try:
            param_diff = compare_concurrent(4, check.steps)
            ok = param_diff <= check.tolerance
            failed += [] if ok else ["drq concurrent"]
            print(f"{'ok  ' if ok else 'FAIL'}  drq concurrent, 4 runs each in its own graph on streams: "
                  f"max |param diff| {param_diff:.2e}")  # fmt: skip
        except Exception as error:
            print(f"FAIL  drq concurrent: {type(error).__name__}: {error}")
            failed.append("drq concurrent")
    random_cases = {
        "drq, augmentation and full replay": drq_case({}, deterministic=False),
        "drq + gradient noise": drq_case({"continual": ("noise",)}, deterministic=False),
        "bbf, augmentation and full prioritized replay": bbf_case(check.bbf_width_scale, deterministic=False),
    }
    for name, build in random_cases.items():
        if not wanted(name):
            continue
        try:
            param_diff, loss_diff = compare(build, check.steps)
            print(f"info  {name} (random streams): max |param diff| {param_diff:.2e}, max |loss diff| {loss_diff:.2e}")
        except Exception as error:
            print(f"FAIL  {name}: {type(error).__name__}: {error}")
            failed.append(name)
    print(f"check_cuda_graphs: {len(failed)} failed" + (f": {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(tyro.cli(CheckArgs))
