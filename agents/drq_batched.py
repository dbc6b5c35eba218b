"""Many DrQ(epsilon) runs in one process, in lockstep: the machinery beside agents/drq.py.

    python agents/drq.py --env-id Pong Boxing --seed 1 2 3 --env-workers 4   # 6 runs, one process

Each (game, seed) run keeps its own network, optimizer, replay, interventions, environment, random
streams and run folder, and gives the numbers it gives alone (tests/test_batched.py). What they
share: one batched forward for acting (rlplastic.batched.StackedModules), and either one vmapped
update for all runs of a stack (--batched-update vmap: heads padded to the most actions, padded
actions masked) or each run's own update (concurrent: on CUDA each run's graph replayed side by
side); their environments step in worker processes (--env-workers); a run whose loss diverges is
set aside while the others go on. The network, the loss and the single update are agents/drq.py's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial

import torch
from rlplastic.envs.atari import canonical_game, clip_reward, step_env
from torch.func import vmap

from rlplastic import batched
from rlplastic.agent_files import load_agent
from rlplastic.augment import drq_augment_runs
from rlplastic.cli import cli_with_presets
from rlplastic.cuda_graphs import CapturedStep, ConcurrentSteps, graph_capture_available
from rlplastic.diagnostics import PlasticityProbe
from rlplastic.env_workers import EnvWorkers
from rlplastic.init import xavier_uniform_zero_bias
from rlplastic.interventions import build_interventions
from rlplastic.replay import FrameReplay, StackedFrameReplays
from rlplastic.runs import Run, exit_on_problems, final_evaluations
from rlplastic.schedules import LinearEpsilon

drq = load_agent("drq")  # the single-run agent: Args, network, loss, update


def action_mask(stack: batched.StackedModules) -> torch.Tensor:
    """(N, most actions): True where run i of the stack has that action."""
    actions = torch.tensor([q.advantage.out_features for q in stack.modules], device=stack.params["value.bias"].device)
    return torch.arange(int(actions.max()), device=actions.device) < actions[:, None]


def sample_states(replay: FrameReplay) -> Callable[[int], torch.Tensor]:
    return lambda n: replay.sample(n).states


def batched_update(
    args,
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

    def run_loss(params, buffers, target_params, target_buffers, valid, *batch):  # one run's, under vmap
        return drq.td_loss(lambda x: online.forward_each(params, buffers, x, valid),
                           lambda x: target.forward_each(target_params, target_buffers, x, valid), *batch)  # fmt: skip

    loss, q_mean = vmap(run_loss)(online.params, online.buffers, target.params, target.buffers, *stacked_batch)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.sum().backward()  # each run's gradient is its own loss's
    online.scatter_grads()
    for optimizer in optimizers:
        optimizer.step()
    return {"td_loss": loss.detach(), "q_values": q_mean}


def store_step(run: Run, replay: FrameReplay, obs, action: int, step: int, result: tuple | None):
    """agents/drq.py's env step and replay add for one run of the batch: `result` is the step its
    worker made (the next episode's first observation already in it when one ended), or None to
    step the run's own environment here. Returns the observation to act on."""
    next_obs, reward, terminated, truncated, info = result if result is not None else step_env(run.env, action)
    # a life loss is a terminal for learning, yet the game goes on (dopamine's terminal_on_life_loss)
    replay.add(obs[-1], action, clip_reward(reward), terminated or info["life_loss"], truncated)
    if terminated or truncated:
        run.episode(step, info)
    return next_obs


def train(all_args: list) -> list[dict]:
    """One run, or several (game, seed) runs of one configuration in one process, in lockstep: each
    with its own network, optimizer, replay, interventions, environment, random streams and run
    folder; runs with one number of actions share batched forwards (rlplastic.batched)."""
    many, args = len(all_args) > 1, all_args[0]
    problems = [f"{a.env_id} seed {a.seed}: {p}" if many else p for a in all_args for p in drq.validate(a)]
    problems += batched.batch_problems(all_args) if many else []
    exit_on_problems("drq", problems)
    runs, nets = [], []
    games = [(canonical_game(a.env_id), a.seed) for a in all_args]
    protocol = (args.run.max_episode_steps, args.run.noop_unit)  # the same for all runs (batch_problems)
    workers = EnvWorkers(games, args.run.env_workers, *protocol) if many and args.run.env_workers else None
    for i, run_args in enumerate(all_args):  # each run seeds, then draws its network, as alone
        runs.append(Run("drq", run_args, [], drq.method_label(run_args), __file__))  # folder, logs, checkpoints
        env = runs[-1].use_env(workers.env(i)) if workers else runs[-1].make_env()
        nets.append(drq.QNetwork(int(env.action_space.n)).to(runs[-1].device))
        if many:
            runs[-1].own_global_rng()  # its later fresh draws come from its own copy of torch's generators
    batched.check_lockstep(runs)
    vmapped = many and batched.update_mode_of(args) == "vmap"  # else each run's own update, no target stacks
    # vmapped: one stack of all runs, heads padded to the most actions; else a stack per number of
    # actions, for acting only (unmasked: each run's numbers exactly as alone)
    groups = batched.group_by(keys := [0 if vmapped else q.advantage.out_features for q in nets])
    stacks = {n: batched.StackedModules([nets[i] for i in members]) for n, members in groups.items()} if many else {}
    masks = {n: action_mask(stack) for n, stack in stacks.items()} if vmapped else {}
    learners = [drq.build_learner(a, 0, run.device, q) for a, run, q in zip(all_args, runs, nets, strict=True)]
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
                                        xavier_uniform_zero_bias, drq.HEAD_MODULES)  # fmt: skip
        interventions.append(items)
        probes.append(PlasticityProbe(q, probe_batch=None))  # the initial weights; its batch comes from replay
        run.keep(q_network=q, optimizer=optimizer, interventions=items, replay=replay, probe=probes[-1],
                 target_network=target)  # fmt: skip
        saved = run.resume()
        obs.append(saved["obs"] if saved else run.env.reset()[0])

    def train_step(i: int = 0) -> None:  # run i's update, its interventions' device work: what a graph captures
        runs[i].losses.add(drq.update(args, *learners[i], replays[i], runs[i].generator))
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

    acts, samplers = [drq.greedy(q) for q in nets], [sample_states(replay) for replay in replays]

    # TRAINING LOOP
    explore = LinearEpsilon(args.learning_starts, args.epsilon_decay_steps, args.epsilon_final)  # dopamine's
    for step in [run.steps() for run in runs][0]:  # every run's clock starts; they step together
        epsilon = explore(step - 1)  # step - 1 agent steps taken so far
        if many:  # one batched forward per stack for the greedy actions; a diverged run's env stays still
            actions = batched.epsilon_greedy_runs(runs, stacks, groups, obs, epsilon, masks)
            actions = [None if run.diverged else action for run, action in zip(runs, actions, strict=True)]
        else:
            explored = batched.explore(runs[0].rng, epsilon, runs[0].env.action_space.n)
            actions = [explored if explored is not None else int(acts[0](obs[0][None])[0])]

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
            obs[i] = store_step(run, replays[i], obs[i], actions[i], step, stepped[i])
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


def train_many(commands: list[list[str]]) -> list[dict]:
    """The runs of several command lines (rlplastic.cli.expand_runs), parsed as agents/drq.py parses one."""
    return train([cli_with_presets(drq.Args, drq.PRESETS, drq.__doc__, command) for command in commands])
