"""The run harness: what every agent run needs around its loop, and the Run object that owns it.

Run holds a run's folder (one writer at a time, never overwriting a finished run), its tensorboard
writer and progress line, its records (training episodes, losses, diagnostics, evaluations), its
checkpoints, built from a registry of stateful objects so that saving and resuming are one call
each, and its results.json, written atomically. RunOptions are the flags that go with it. The
folder lock and the checkpoint files themselves are rlplastic.checkpoints'.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from rlplastic.checkpoints import (
    CHECKPOINT_FORMAT,
    RESUMABLE_CHANGES,
    hold_run_folder,
    load_checkpoint,
    output_dir_problems,
    save_checkpoint,
)
from rlplastic.cli import seed_problems
from rlplastic.envs.atari import MAX_EPISODE_STEPS, canonical_game, make_atari100k_env
from rlplastic.evaluation import EvalResult, episode_quotas, evaluate_episodes, evaluate_runs
from rlplastic.files import atomic_torch_save, atomic_write_json
from rlplastic.machine import (
    device_generator,
    git_commit,
    resolve_device,
    seed_everything,
    set_cpu_threads,
)


def tracking_problems(track: bool, track_tensorboard: bool) -> list[str]:
    """--track (Weights & Biases, CleanRL's convention) needs wandb installed and tensorboard on,
    since it syncs the tensorboard scalars."""
    if not track:
        return []
    problems = []
    if importlib.util.find_spec("wandb") is None:
        problems.append("--track needs wandb, which is not installed: pip install 'rlplastic[track]' (or wandb)")
    if not track_tensorboard:
        problems.append("--track syncs the tensorboard scalars: drop --no-track-tensorboard")
    return problems


def start_tracking(project: str, entity: str | None, run_dir: Path, run_name: str, config: dict) -> None:
    """Log the run to Weights & Biases as CleanRL does: wandb.init(sync_tensorboard=True) before the
    SummaryWriter is made, so every tensorboard scalar is also sent. The wandb run id is the run
    folder's name, so a resumed run continues the same wandb run."""
    import wandb

    wandb.init(project=project, entity=entity, sync_tensorboard=True, config=config, name=run_name,
               dir=str(run_dir), id=run_dir.resolve().name, resume="allow", save_code=False)  # fmt: skip


def log_final_evaluation(writer, returns: list[float], mean: float, step: int) -> None:
    """The final evaluation in tensorboard: eval/mean_return at the last step and, as CleanRL logs
    it, every episode's return as eval/episodic_return with the episode's index as its x value."""
    if not returns:
        return
    writer.add_scalar("eval/mean_return", mean, step)
    for episode, episode_return in enumerate(returns):
        writer.add_scalar("eval/episodic_return", episode_return, episode)


def hparams_markdown(config: dict[str, Any]) -> str:
    """The hyperparameter table CleanRL puts in tensorboard's text tab."""
    rows = "\n".join(f"|{key}|{value}|" for key, value in config.items())
    return f"|param|value|\n|-|-|\n{rows}"


class Progress:
    """Training progress every `every` steps: a tqdm bar on a terminal, one line each time in a log
    file. The ETA knows the phases: random play (before `learning_starts`) runs far faster than
    learning, so each phase's rate is measured on report windows wholly inside it, and the time
    left for learning is unknown (shown as '?') until learning has been timed; the final
    evaluation comes on top (it has its own bar)."""

    def __init__(self, total: int, every: int, start: int = 0, learning_starts: int = 0, stream=None):
        self.total, self.every, self.learning_starts = total, max(1, every), learning_starts
        self.stream = stream or sys.stdout
        self.start_time = self.last_time = time.perf_counter()
        self.last_step = start
        self.rates: dict[str, float] = {}  # phase -> steps/s of its latest whole window
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", file=self.stream, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}]{postfix}")  # fmt: skip

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def phase(self, step: int) -> str:
        return "random play" if step < self.learning_starts else "learning"

    def steps_per_second(self, step: int) -> float:
        """Rate since the previous report, kept as its phase's rate when the window lies in one phase."""
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        if self.phase(self.last_step + 1) == self.phase(step):
            self.rates[self.phase(step)] = rate
        self.last_time, self.last_step = now, step
        return rate

    def eta_seconds(self, step: int) -> float | None:
        """Seconds of training left; None while the learning phase's rate is unknown."""
        random_left = max(0, min(self.learning_starts, self.total) - step)
        learning_left = self.total - max(step, min(self.learning_starts, self.total))
        if learning_left and "learning" not in self.rates:
            return None
        random_time = random_left / self.rates["random play"] if random_left else 0.0
        return random_time + (learning_left / self.rates["learning"] if learning_left else 0.0)

    def report(self, step: int, rate: float, **fields: Any) -> None:
        eta = self.eta_seconds(step)
        eta_text = f"eta {eta / 60:.1f}m" if eta is not None else "eta ? (learning not timed yet)"
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"{self.phase(step)}, {rate:.0f} steps/s, {eta_text} {extra}")
            if step >= self.total:
                self.bar.close()
            return
        elapsed = time.perf_counter() - self.start_time
        print(f"step {step}/{self.total} ({100 * step / self.total:.0f}%) {self.phase(step)} {rate:.0f} steps/s "
              f"elapsed {elapsed / 60:.1f}m {eta_text} {extra}", file=self.stream, flush=True)  # fmt: skip


class EpisodeProgress:
    """Progress of an evaluation, episode by episode: a tqdm bar on a terminal, a line every tenth
    of the episodes in a log file. Call it with (episodes done, episodes in all)."""

    def __init__(self, what: str, stream=None):
        self.what, self.stream, self.bar, self.shown = what, stream or sys.stdout, None, 0

    def __call__(self, done: int, total: int) -> None:
        if self.stream.isatty():
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=self.what, unit="episode", file=self.stream, dynamic_ncols=True)
            self.bar.update(done - self.bar.n)
            if done >= total:
                self.bar.close()
        elif done * 10 // total > self.shown * 10 // total or done == total:
            self.shown = done
            print(f"{self.what}: {done}/{total} episodes", file=self.stream, flush=True)


@dataclass
class RunOptions:
    """How an agent run is kept, logged and evaluated (the Atari-100k evaluation protocol)."""

    output_dir: str | None = None
    """run folder for results.json, tensorboard files and checkpoints; {method}, {game} and {seed} in
    it are filled in; default runs/{method}/{game}/seed{seed}__{time}"""
    exp_name: str | None = None
    """method label: names the run folder and groups runs in reports; default the agent plus its
    chosen interventions, e.g. drq+hare-tortoise+head"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where networks, replay and augmentation live: auto takes cuda when present"""
    deterministic: bool = True
    """deterministic cuDNN kernels; on the CPU the same seed gives bit-identical results"""
    eval_episodes: int = 100
    """episodes of the final evaluation"""
    eval_epsilon: float = 0.001
    """exploration rate of every evaluation"""
    eval_envs: int = 8
    """environments stepped in lockstep during evaluation (batches the network's forward)"""
    eval_every: int = 0
    """agent steps between evaluations during training (dopamine evaluates every 10,000); each point
    goes into results.json's eval_curve and tensorboard's eval/mean_return; 0 = only the final one"""
    eval_every_episodes: int = 100
    """episodes of each evaluation during training (--eval-every); fewer make them cheaper"""
    max_episode_steps: int = MAX_EPISODE_STEPS
    """cap on an episode's agent steps, training and evaluation (27k = 108k frames)"""
    noop_unit: Literal["agent-steps", "frames"] = "agent-steps"
    """what the 0..29 noops that start every episode (training and evaluation) are: agent steps, as in
    dopamine's Atari-100k runner since 2023, or single emulator frames, as in its 2021 runner (the one
    DrQ_eps.gin configured when Agarwal et al. 2021 released their runs; rlplastic.envs.atari)"""
    diag_every: int = 5_000
    """agent steps between plasticity diagnostics (tensorboard plasticity/..., results.json); 0 = never"""
    diag_batch: int = 256
    """replay states in the fixed probe batch of the diagnostics"""
    checkpoint_every: int = 10_000
    """agent steps between checkpoints (networks, optimizer, replay, env and random states) in the run
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
    env_workers: int = 0
    """several runs in one process (--env-id A B --seed 1 2): worker processes that step their
    environments in parallel; 0 = step them in this process, one after another"""
    threads: int = 0
    """torch's CPU threads; 0 = OMP_NUM_THREADS when set, else the cores this process may use. Processes
    side by side on the same cores each want their share (e.g. --threads 1 for two runs on 2 cores):
    more threads than cores slow every process down several times (scripts/bench_threads.py)"""
    save_model: bool = False
    """after training, save the acting network's weights (a plain state_dict) in the run folder, e.g.
    to evaluate it again at another epsilon (scripts/drq_evaluate.py)"""

    def problems(self) -> list[str]:
        """Every problem with these options, each naming the value and what is allowed."""
        problems = []
        for name in ("eval_envs", "eval_every_episodes", "max_episode_steps", "diag_batch", "log_every"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} {getattr(self, name)}: must be a positive integer")
        for name in ("eval_episodes", "eval_every", "diag_every", "checkpoint_every", "env_workers", "threads"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 0 (0 = never)")
        if not 0.0 <= self.eval_epsilon <= 1.0:
            problems.append(f"--eval-epsilon {self.eval_epsilon}: must lie in [0, 1]")
        try:
            resolve_device(self.device)
        except ValueError as e:
            problems.append(str(e))
        return problems + output_dir_problems(self.output_dir) + tracking_problems(self.track, self.track_tensorboard)


def run_folder(out: str | Path, method: str, game: str, seed: int) -> Path:
    """The one layout of run folders, for every entry point: OUT/{method}/{game}/seed{seed}."""
    return Path(out) / method / game / f"seed{seed}"


def fill_output_dir(output_dir: str | None, method: str, game: str, seed: int) -> Path:
    """A run's folder: --output-dir with any {method}, {game} and {seed} in it filled in; without
    one, runs/{method}/{game}/seed{seed}__{time} (the time keeps repeated runs apart)."""
    if output_dir is None:
        folder = run_folder("runs", method, game, seed)
        return folder.with_name(f"{folder.name}__{int(time.time())}")
    return Path(output_dir.replace("{method}", method).replace("{game}", game).replace("{seed}", str(seed)))


def exit_on_problems(agent: str, problems: list[str]) -> None:
    """Stop before any work with every problem of the arguments, one per line (exit status 1)."""
    if problems:
        sys.exit(f"{agent}: invalid arguments:\n  " + "\n  ".join(problems))


def run_problems(args: Any) -> list[str]:
    """The problems of what every agent run has: the game (--env-id), its length (--total-steps)
    and its RunOptions (args.run)."""
    problems = []
    try:
        canonical_game(args.env_id)
    except ValueError as e:
        problems.append(str(e))
    if args.total_steps <= 0:
        problems.append(f"--total-steps {args.total_steps}: must be a positive integer")
    problems += seed_problems("--seed", args.seed)
    return problems + args.run.problems()


def flat_config(args: Any) -> dict[str, Any]:
    """An agent's Args as one flat dict: the fields of nested option dataclasses at the top level,
    as their flags are on the command line."""
    config: dict[str, Any] = {}
    for f in fields(args):
        value = getattr(args, f.name)
        config |= flat_config(value) if is_dataclass(value) else {f.name: value}
    return config


class RandomStates:
    """Every random stream a run draws from, as one stateful object: acting (`rng`), sampling and
    augmentation (`generator`), and torch's global generators (fresh re-inits of interventions).
    When several runs share a process, each keeps its own copy of the global ones (`own`)."""

    def __init__(self, rng: np.random.Generator, generator: torch.Generator):
        self.rng, self.generator = rng, generator
        self.own: dict[str, Any] | None = None

    def global_states(self) -> dict[str, Any]:
        cuda = self.generator.device.type == "cuda"
        return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if cuda else None}

    @staticmethod
    def set_global_states(states: dict[str, Any]) -> None:
        torch.set_rng_state(states["torch"].cpu())
        if states["cuda"] is not None:
            torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])

    def state_dict(self) -> dict[str, Any]:
        streams = self.own if self.own is not None else self.global_states()
        return {"rng": self.rng.bit_generator.state, "generator": self.generator.get_state(), **streams}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"].cpu())
        streams = {"torch": state["torch"], "cuda": state["cuda"]}
        if self.own is not None:
            self.own = streams
        else:
            self.set_global_states(streams)


class DeviceMeans:
    """Scalars of every update summed where they are computed (an in-place add each, no host sync,
    so a CUDA graph may capture add() once the sums exist), read as means once per log interval.
    tick() counts an update, on the host."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            if key in self.sums:
                self.sums[key].add_(value)
            else:
                self.sums[key] = value.detach().float().clone()

    def tick(self) -> None:
        self.count += 1

    def totals(self) -> dict[str, float]:
        return {key: value.item() for key, value in self.sums.items()}

    def read(self) -> dict[str, float]:
        """The means since the last read (one host sync per scalar), then start over."""
        if not self.count:
            return {}
        means = {key: total / self.count for key, total in self.totals().items()}
        for value in self.sums.values():
            value.zero_()  # in place: a captured graph keeps adding into these tensors
        self.count = 0
        return means

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state["sums"].items():
            if key in self.sums:
                self.sums[key].copy_(value)
            else:
                self.sums[key] = value.clone()
        self.count = int(state["count"])


class Run:
    """The recorder of one agent run, from its start (or resumption) to its results.json: its folder
    (one writer), its random streams, logs (tensorboard, wandb, progress), records, checkpoints and
    evaluations. The agent's loop acts, steps and learns; it tells the run what happened.

        run = Run("drq", args, validate(args), method_label(args), __file__)  # exits on problems
        env = run.make_env()                                # ... networks, optimizer, replay
        run.keep(q_network=q, optimizer=optimizer, replay=replay, interventions=interventions)
        saved = run.resume()                                # None, or the extras of the last checkpoint
        for step in run.steps():
            ...                                             # act (run.rng), update, env.step, replay.add
            run.losses.add({"td_loss": loss}); run.losses.tick()
            if episode_ended: run.episode(step, info)
            if run.report_due(step): run.report(step, {"epsilon": epsilon}, interventions.metrics())
            run.checkpoint(step, obs=obs)                   # when due
        results = run.finish(greedy_actions, [q], {"update_mode": "eager"})

    Everything kept with keep() (objects with state_dict() / load_state_dict()) is saved at every
    checkpoint and restored by resume(), with the run's random streams, its loss sums and its
    records. Checkpoints hold tensors, arrays and plain data only and are read with
    torch.load(weights_only=True): a checkpoint from someone else cannot run code."""

    live: list[Run] = []  # the runs of this process that have started and not finished (for interruptible)

    def __init__(self, agent: str, args: Any, problems: list[str], method: str, code: str | None = None):
        """`args`: the agent's Args, with env_id, seed, total_steps and run (RunOptions). `problems`:
        what its validation found (the run exits with them before any work). `method`: the label
        reports group runs by. `code`: the agent's file, whose git commit the results record."""
        exit_on_problems(agent, problems)  # before any work: nothing is created for a run that cannot start
        options: RunOptions = args.run
        self.agent, self.options, self.method = agent, options, method
        self.game = game = canonical_game(args.env_id)
        self.seed, self.total_steps = args.seed, args.total_steps
        self.device = resolve_device(options.device)
        self.config = flat_config(args) | {"env_id": game, "device": str(self.device)}
        self.folder = fill_output_dir(options.output_dir, method, game, self.seed)
        if options.output_dir is not None and str(self.folder) != options.output_dir:  # a template, filled
            exit_on_problems(agent, output_dir_problems(str(self.folder)))
        hold_run_folder(self.folder, agent)  # one writer per folder, released by the OS if this process dies
        self.commit = git_commit(code)  # the code that runs, read now: HEAD may move while it runs
        self.checkpoint_path = self.folder / "checkpoint.pt"
        self._checkpoint = load_checkpoint(self.checkpoint_path, self.config, RESUMABLE_CHANGES, self.device, agent)
        self.start_step = self._checkpoint["step"] + 1 if self._checkpoint else 1
        self.step = self.start_step - 1  # the last agent step taken
        self.saved_step = self.start_step - 1 if self._checkpoint else None  # that of the last checkpoint
        if options.track:  # before the SummaryWriter, so that wandb syncs its scalars
            start_tracking(options.wandb_project_name, options.wandb_entity, self.folder, self.folder.name, self.config)
        self.writer = None
        if options.track_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events logged after the checkpoint by an interrupted session
            self.writer = SummaryWriter(str(self.folder), purge_step=self.start_step)
            if not self._checkpoint:
                self.writer.add_text("hyperparameters", hparams_markdown(self.config))
        threads = set_cpu_threads(options.threads)
        print(f"{agent}: {game} seed {self.seed} on {self.device} ({threads} CPU thread(s)), {self.total_steps} steps "
              f"-> {self.folder}", flush=True)  # fmt: skip
        if self.writer is not None:
            print(f"{agent}: watch it with `tensorboard --logdir {self.folder}`; results.json lands there at the end",
                  flush=True)  # fmt: skip
        seed_everything(self.seed, options.deterministic)
        self.generator = device_generator(self.device, self.seed)  # replay sampling and augmentation
        self.rng = np.random.default_rng(self.seed)  # acting
        self.losses = DeviceMeans()
        self.records: dict[str, list] = {"train_episodes": [], "train_log": [], "diagnostics": [], "eval_curve": []}
        self.random = RandomStates(self.rng, self.generator)
        self.objects: dict[str, Any] = {"random": self.random, "losses": self.losses}
        self.progress = Progress(self.total_steps, options.log_every, start=self.start_step - 1,
                                 learning_starts=getattr(args, "learning_starts", 0))  # fmt: skip
        self.env: Any = None  # make_env()
        self.time_before = 0.0  # train time of earlier, interrupted sessions of this run
        self.start_time = time.time()
        self.end_time: float | None = None  # when training ended (stop_clock), before the final evaluation
        self.diverged: str | None = None  # why, once a loss was not finite (see finite())
        Run.live.append(self)

    # Checkpoints
    def keep(self, **objects: Any) -> None:
        """Register stateful objects (state_dict() / load_state_dict()) for checkpoints; one given
        as None is an optional part the run does not have (an EMA target without --ema): skipped."""
        for name, obj in objects.items():
            if obj is None:
                continue
            if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
                raise TypeError(f"{name}: a {type(obj).__name__} has no state_dict() / load_state_dict() to keep")
            if name in self.objects:
                raise ValueError(f"{name}: kept twice")
            self.objects[name] = obj

    def resume(self) -> dict[str, Any] | None:
        """Restore everything kept from the checkpoint found at start; its extras, or None."""
        checkpoint, self._checkpoint = self._checkpoint, None
        if checkpoint is None:
            return None
        if set(checkpoint["objects"]) != set(self.objects):
            sys.exit(f"{self.agent}: {self.checkpoint_path} holds {sorted(checkpoint['objects'])}, this run keeps "
                     f"{sorted(self.objects)}; start over in another --output-dir")  # fmt: skip
        for name, obj in self.objects.items():
            obj.load_state_dict(checkpoint["objects"][name])
        self.records, self.time_before = checkpoint["records"], checkpoint["train_time_s"]
        print(f"{self.agent}: resumed from {self.checkpoint_path} at step {checkpoint['step']}", flush=True)
        return checkpoint["extras"]

    def checkpoint(self, step: int, **extras: Any) -> None:
        """Every --checkpoint-every steps (not at the last): save everything kept, the records and
        `extras` (plain data the loop carries, such as the current observation)."""
        every = self.options.checkpoint_every
        if not (every and step % every == 0 and step < self.total_steps):
            return
        # never replace the last good checkpoint by a diverged one (one read per checkpoint)
        if self.diverged or not self.finite(self.losses.totals(), step):
            return
        payload = {"format": CHECKPOINT_FORMAT, "agent": self.agent, "step": step, "config": self.config,
                   "git_commit": self.commit, "objects": {name: obj.state_dict() for name, obj in self.objects.items()},
                   "records": self.records, "extras": extras, "train_time_s": self.train_time()}  # fmt: skip
        save_checkpoint(self.checkpoint_path, payload, self.agent)
        self.saved_step = step

    def finite(self, losses: dict[str, float], step: int) -> bool:
        """Whether the losses (read anyway for a report or a checkpoint) are finite. If not, the run
        has diverged: diverged.json in its folder says by which step and which losses, its last good
        checkpoint is kept and it writes no results.json. A run alone stops (exit non-zero, the
        message naming the step and losses); a run sharing its process with others (own_global_rng)
        is set aside instead (`diverged`: it reports, checkpoints and evaluates no more) so that one
        diverged run does not stop the others; the agent exits non-zero once they have finished."""
        bad = {key: value for key, value in losses.items() if not math.isfinite(value)}
        if not bad:
            return True
        kept = (f"the last good checkpoint {self.checkpoint_path} is kept" if self.checkpoint_path.exists()
                else "no checkpoint yet")  # fmt: skip
        self.diverged = f"{self.agent}: training diverged by step {step} ({bad}); {kept}; no results written"
        atomic_write_json(self.folder / "diverged.json", {"step": step, "losses": {k: str(v) for k, v in bad.items()},
                                                          "message": self.diverged})  # fmt: skip
        if self.random.own is None:
            sys.exit(self.diverged)
        print(f"{self.diverged} ({self.game} seed {self.seed}); the other runs of this process go on", flush=True)
        return False

    def set_aside(self) -> None:
        """A diverged run among several, at the end: close its logs and environment (no results)."""
        Run.live.remove(self)
        if self.writer:
            self.writer.close()
        if self.env is not None:
            self.env.close()

    def own_global_rng(self) -> None:
        """For several runs in one process: from now on this run draws from its own copy of torch's
        global generators (the fresh draws of its interventions), as it would alone; code of this
        run that may draw from them runs inside global_rng()."""
        self.random.own = self.random.global_states()

    @contextlib.contextmanager
    def global_rng(self):
        """Torch's global generators are this run's own inside (see own_global_rng)."""
        if self.random.own is None:
            yield
            return
        outside = self.random.global_states()
        self.random.set_global_states(self.random.own)
        try:
            yield
        finally:
            self.random.own = self.random.global_states()
            self.random.set_global_states(outside)

    # The loop
    def steps(self) -> Iterator[int]:
        """The agent steps left to take; `step` follows them (the step an interruption names)."""
        self.start_time = time.time()
        return self._count(range(self.start_step, self.total_steps + 1))

    def _count(self, steps: range) -> Iterator[int]:
        for step in steps:
            self.step = step
            yield step

    def interrupted(self) -> str:
        """What an interruption leaves of this run, in one line: the step reached, the checkpoint kept
        and how to resume."""
        if self.step >= self.total_steps:
            where = "in the final evaluation"
        else:
            where = f"at step {self.step} of {self.total_steps}"
        kept = f"its checkpoint at step {self.saved_step} is kept" if self.saved_step else "no checkpoint yet"
        return (f"{self.agent}: {self.game} seed {self.seed} interrupted {where}; {kept} in {self.folder}: "
                "run the same command to resume")  # fmt: skip

    def train_time(self) -> float:
        """Seconds of training (all sessions), up to stop_clock() once it has been called."""
        return self.time_before + (self.end_time or time.time()) - self.start_time

    def stop_clock(self) -> None:
        """Training is over: what follows (the final evaluation) is not training time."""
        self.end_time = self.end_time or time.time()

    def make_env(self) -> Any:
        """The training environment (Atari-100k protocol, seeded with the run), kept for checkpoints."""
        return self.use_env(self.protocol_env(self.seed))

    def protocol_env(self, seed: int) -> Any:
        """An environment of this run's game under its protocol options (episode cap, noop unit)."""
        return make_atari100k_env(self.game, seed, max_episode_steps=self.options.max_episode_steps,
                                  noop_unit=self.options.noop_unit)  # fmt: skip

    def use_env(self, env: Any) -> Any:
        """Train on `env` (e.g. an rlplastic.env_workers stand-in), kept for checkpoints."""
        self.env = env
        self.keep(env=env)
        return env

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self.writer:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)

    def episode(self, step: int, info: dict) -> None:
        """Record a finished training episode (info["episode"] of the Atari-100k protocol)."""
        episode_return, length = info["episode"]["r"], info["episode"]["l"]
        self.records["train_episodes"].append({"step": step, "return": episode_return, "length": length})
        self.log({"charts/episodic_return": episode_return, "charts/episodic_length": length}, step)

    def report_due(self, step: int) -> bool:
        return self.progress.due(step)

    def report(self, step: int, charts: dict[str, float], activity: dict[str, float], **train_fields: Any) -> None:
        """The progress line and tensorboard scalars: the loss means since the last report
        (losses/..., stopping a diverged run), `charts` (charts/...) and the interventions'
        `activity` (interventions/..., and results.json's activity); the losses go into the train
        log with `train_fields`."""
        if self.diverged:
            return
        rate = self.progress.steps_per_second(step)
        episodes = self.records["train_episodes"]
        fields: dict[str, Any] = {"episodes": len(episodes)}
        if episodes:
            fields["return(last10)"] = float(np.mean([e["return"] for e in episodes[-10:]]))
        losses = self.losses.read()
        if losses:
            if not self.finite(losses, step):
                return
            self.records["train_log"].append({"step": step, **train_fields, **losses})
            self.log({f"losses/{key}": value for key, value in losses.items()}, step)
        self.log({"charts/SPS": rate} | {f"charts/{key}": value for key, value in charts.items()}
                 | {f"interventions/{key}": value for key, value in activity.items()}, step)  # fmt: skip
        if activity:  # results.json "activity": the report draws it beside the diagnostics
            self.records.setdefault("activity", []).append({"step": step, **activity})
        self.progress.report(step, rate, **charts, **fields, **losses)

    def diagnose(self, step: int, probe: Any, sample_states: Callable[[int], torch.Tensor], ready: bool) -> None:
        """Every --diag-every steps once `ready` (replay can be sampled): the probe's measurements
        on a batch of states fixed at the first measurement, so that values are comparable."""
        every = self.options.diag_every
        if not (every and step % every == 0 and ready) or self.diverged:
            return
        if probe.probe_batch is None:
            probe.probe_batch = sample_states(self.options.diag_batch)
        metrics = probe.measure()
        self.records["diagnostics"].append({"step": step, **metrics})
        self.log({f"plasticity/{key}": value for key, value in metrics.items()}, step)

    # Evaluation and results
    def evaluate(self, act: Callable[[np.ndarray], np.ndarray], episodes: int, seed: int,
                 progress: Callable[[int, int], None] | None = None) -> EvalResult:  # fmt: skip
        """Epsilon-greedy episodes of the current policy on fresh environments seeded apart from
        training (the training environment and random streams are untouched)."""
        options = self.options
        return evaluate_episodes(self.protocol_env, act, episodes, options.eval_envs, options.eval_epsilon, seed,
                                 progress)  # fmt: skip

    @property
    def final_eval_seed(self) -> int:
        return self.seed + 10_000  # evaluation episodes never replay the training seed's starts

    def evaluate_if_due(self, step: int, act: Callable[[np.ndarray], np.ndarray], modules: Sequence[Any]) -> None:
        """Every --eval-every steps before the last: a point of the eval curve (modules in eval mode)."""
        every = self.options.eval_every
        if not (every and step % every == 0 and step < self.total_steps) or self.diverged:
            return
        for module in modules:
            module.eval()
        point = self.evaluate(act, self.options.eval_every_episodes, self.seed + 20_000 + step)
        for module in modules:
            module.train()
        self.records["eval_curve"].append({"step": step, "mean": point.mean, "returns": point.returns})
        self.log({"eval/mean_return": point.mean}, step)
        print(f"{self.agent}: step {step} eval mean {point.mean} over {len(point.returns)} episodes", flush=True)

    def finish(
        self,
        act: Callable[[np.ndarray], np.ndarray],
        modules: Sequence[Any],
        results: dict[str, Any],
        models: dict[str, torch.nn.Module] | None = None,
        evaluation: EvalResult | None = None,
    ) -> dict[str, Any]:
        """The final evaluation (modules in eval mode; `evaluation` if it was played already, by
        final_evaluations), then results.json, written atomically with `results` and the run's
        records; --save-model saves each of `models` as <name>.pt (a plain state_dict). The
        checkpoint goes: the results supersede it, and it holds the whole replay. The training
        environment is closed."""
        self.stop_clock()
        if self.options.save_model:
            for name, model in (models or {}).items():
                atomic_torch_save(self.folder / f"{name}.pt", {k: v.cpu() for k, v in model.state_dict().items()})
        print(f"{self.agent}: evaluating {self.options.eval_episodes} episodes (epsilon {self.options.eval_epsilon})",
              flush=True)  # fmt: skip
        for module in modules:
            module.eval()
        if evaluation is None:
            progress = EpisodeProgress(f"{self.agent}: final evaluation")
            evaluation = self.evaluate(act, self.options.eval_episodes, self.final_eval_seed, progress)
        if evaluation.returns:
            self.records["eval_curve"].append(
                {"step": self.total_steps, "mean": evaluation.mean, "returns": evaluation.returns}
            )
        results = {"agent": self.agent, "method": self.method, "game": self.game, "seed": self.seed,
                   "total_steps": self.total_steps, **results, "eval_episodes": len(evaluation.returns),
                   "eval_returns": evaluation.returns, "eval_lengths": evaluation.lengths, "eval_mean": evaluation.mean,
                   **self.records, "wall_time_s": self.time_before + time.time() - self.start_time,
                   "train_time_s": self.train_time(), "config": self.config,
                   "git_commit": self.commit, "torch_version": torch.__version__}  # fmt: skip
        if self.writer:
            log_final_evaluation(self.writer, evaluation.returns, evaluation.mean, self.total_steps)
            self.writer.close()
        atomic_write_json(self.folder / "results.json", results)
        self.checkpoint_path.unlink(missing_ok=True)
        (self.folder / "diverged.json").unlink(missing_ok=True)  # an earlier attempt's, superseded
        print(f"{self.agent}: eval mean {evaluation.mean} over {len(evaluation.returns)} episodes -> "
              f"{self.folder / 'results.json'}")  # fmt: skip
        if self.env is not None:
            self.env.close()
        Run.live.remove(self)
        return results


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, as Ctrl-C raises KeyboardInterrupt (see interruptible)."""


@contextlib.contextmanager
def interruptible(agent: str):
    """Around an agent's runs: Ctrl-C (SIGINT) or SIGTERM ends them with one line per run (the step it
    reached, the checkpoint kept, how to resume: Run.interrupted) instead of a traceback, and exit
    status 130 or 143 as a shell reports a process those signals stopped. Files being written are
    left whole (atomic writes drop their temp file); the last checkpoint stays."""

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except KeyboardInterrupt as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while the lines print
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for run in Run.live or []:
            print(run.interrupted(), file=sys.stderr, flush=True)
        if not Run.live:
            print(f"{agent}: interrupted before any run started", file=sys.stderr, flush=True)
        raise SystemExit(143 if isinstance(e, Terminated) else 130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def final_evaluations(
    runs: Sequence[Run], acts: Sequence[Callable[[np.ndarray], np.ndarray]], modules: Sequence[Any], processes: int
) -> list[EvalResult | None]:
    """The final evaluations of the runs of one process at once, every run's evaluation
    environments stepping in `processes` worker processes: the episodes each run plays alone in
    Run.finish (same environments, seeds and exploration draws), on all cores. Hand each result to
    its run's finish(evaluation=...). `modules` go to eval mode first. Nones (each run evaluates
    in its finish) for a single run, no workers or no evaluation episodes. Every run's training
    clock stops here, so no run counts another's evaluation as training time."""
    from rlplastic.env_workers import EnvWorkers

    options = runs[0].options
    for run in runs:  # all trained together: none of them trains during another's evaluation
        run.stop_clock()
    if len(runs) < 2 or processes < 1 or options.eval_episodes < 1:
        return [None] * len(runs)
    per_run = len(episode_quotas(options.eval_episodes, options.eval_envs))
    for module in modules:
        module.eval()
    seeds = [run.final_eval_seed for run in runs]
    workers = EnvWorkers([(run.game, seed + i) for run, seed in zip(runs, seeds, strict=True) for i in range(per_run)],
                         processes, options.max_episode_steps, options.noop_unit)  # fmt: skip
    try:
        return evaluate_runs(workers, acts, options.eval_episodes, options.eval_envs, options.eval_epsilon, seeds,
                             EpisodeProgress(f"{runs[0].agent}: final evaluations of {len(runs)} runs"))  # fmt: skip
    finally:
        workers.close()
