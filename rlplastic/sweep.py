"""Sweeps of single-file agent runs: one run folder per (method, game, seed), launched by local
worker processes or as a slurm job array through submitit.

A run is finished when its folder holds results.json; a re-run of the same sweep skips those and
starts the others again in the same folder, where the agent resumes from its checkpoint. Every
grid point is parsed and validated by the agent itself before anything is launched.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import TextIO

from rlplastic.agent_files import agent_path, load_agent
from rlplastic.checkpoints import ADDED_ARGUMENTS, RESUMABLE_CHANGES
from rlplastic.cli import seed_problems
from rlplastic.envs.atari import ATARI100K_GAMES, canonical_game
from rlplastic.files import atomic_write
from rlplastic.runs import flat_config, run_folder

# Flags a sweep sets itself for every run: the grid may not touch them.
SWEEP_OWNED = {"env_id", "seed", "output_dir"}


class SweepError(ValueError):
    """A bad sweep definition, found before any run starts."""


def parse_seeds(text: str) -> list[int]:
    """'1-5' -> [1..5]; '1,3,7'; '1-3,8'."""
    seeds = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                seeds += range(lo, hi + 1)
            else:
                seeds.append(int(part))
        except ValueError:
            raise SweepError(
                f"--seeds {text!r}: {part!r} is not a seed or a range LOW-HIGH (e.g. 1-5 or 1,3,7)"
            ) from None
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds {text!r}: a seed is listed twice")
    problems = [problem for seed in seeds for problem in seed_problems("--seeds", seed)]
    if problems:
        raise SweepError(f"{problems[0]} (in {text!r})")
    return seeds


def parse_games(text: str) -> list[str]:
    """'all' -> the 26 Atari-100k games; else a comma-separated list of names."""
    if text.strip().lower() == "all":
        return list(ATARI100K_GAMES)
    try:
        games = [canonical_game(g) for g in text.split(",") if g.strip()]
    except ValueError as e:
        raise SweepError(f"--games {text!r}: {e}") from None
    if not games or len(set(games)) != len(games):
        raise SweepError(f"--games {text!r}: give 'all' or distinct game names separated by commas")
    return games


def flag_args(key: str, value: str) -> list[str]:
    """One KEY=VALUE setting as agent arguments: 'reset', 'hare-tortoise redo' -> ['--reset',
    'hare-tortoise', 'redo']; booleans true/false -> --key / --no-key; an empty value -> nothing."""
    flag = key.strip().replace("_", "-")
    if value.lower() in ("true", "false"):
        return [f"--{flag}" if value.lower() == "true" else f"--no-{flag}"]
    if value.strip() == "":
        return []
    return [f"--{flag}", *value.split()]


def parse_setting(text: str, option: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SweepError(f"{option} {text!r}: expected KEY=VALUE, e.g. {option} reset=hare-tortoise")
    key = key.strip().replace("-", "_")
    if key in SWEEP_OWNED:
        raise SweepError(f"{option} {text!r}: {key} is set by the sweep itself (--games, --seeds, --out)")
    return key, value


@dataclass(frozen=True)
class RunSpec:
    """One agent run of a sweep."""

    agent: str
    method: str
    game: str
    seed: int
    args: tuple[str, ...]  # the agent arguments of the grid point, without game, seed and folder
    run_dir: Path
    # the grid point's settings as results.json's config holds them (flat, JSON values), without those
    # the sweep sets and those that change no result: what a finished run in run_dir must match
    settings: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.txt"

    def command(self) -> list[str]:
        return [
            sys.executable, str(agent_path(self.agent)), *self.args,
            "--env-id", self.game, "--seed", str(self.seed), "--output-dir", str(self.run_dir),
        ]  # fmt: skip

    def status(self) -> str:
        """finished (results.json), conflict (a results.json of other settings: differences()),
        diverged (diverged.json: its losses turned non-finite, which a resumed run would repeat, so a
        sweep does not retry it), unfinished (started before: resumes), or new."""
        if (self.run_dir / "results.json").exists():
            return "conflict" if self.differences() else "finished"
        if (self.run_dir / "diverged.json").exists():
            return "diverged"
        return "unfinished" if self.run_dir.exists() else "new"

    def differences(self) -> list[str]:
        """The settings in which the finished run in run_dir differs from this one: 'key: theirs,
        not ours' (an unreadable results.json differs in everything)."""
        try:
            theirs = json.loads((self.run_dir / "results.json").read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return [f"results.json cannot be read ({type(e).__name__})"]
        theirs = {**ADDED_ARGUMENTS, **theirs}
        return [f"{key}: {theirs.get(key)!r} there, {value!r} here" for key, value in self.settings.items()
                if theirs.get(key) != value]  # fmt: skip


def result_settings(parsed) -> dict:
    """An agent's parsed Args as the settings a finished run of it must have (see RunSpec.settings)."""
    config = json.loads(json.dumps(flat_config(parsed), default=str))  # tuples as lists, as results.json
    return {k: v for k, v in config.items() if k not in SWEEP_OWNED and k not in RESUMABLE_CHANGES}


def expand_grid(
    agent: str,
    games: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    settings: Sequence[str] = (),
    grid: Sequence[str] = (),
) -> list[RunSpec]:
    """The runs of a sweep: every combination of the --grid values, with the --set values on all of
    them, times games and seeds. Each grid point is parsed and validated by the agent, and named by
    the agent's method label (plus key=value for grid keys the label does not show)."""
    module = load_agent(agent)
    fixed = [parse_setting(s, "--set") for s in settings]
    axes = []
    for text in grid:
        key, values = parse_setting(text, "--grid")
        axes.append([(key, v) for v in values.split(",")])
    keys = [fixed_key for fixed_key, _ in fixed] + [axis[0][0] for axis in axes]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise SweepError(f"{', '.join(repeated)} given more than once across --set and --grid")

    points, labels = [], {}
    for combo in itertools.product(*axes):
        args = [a for key, value in (*fixed, *combo) for a in flag_args(key, value)]
        parsed = parse_agent_args(module, agent, args)
        method = module.method_label(parsed)
        label_free = [f"{k}={v}" for k, v in combo if k not in module.LABELLED_ARGS]
        if label_free and parsed.run.exp_name is None:
            method += "@" + ",".join(label_free)
        if method in labels:
            raise SweepError(
                f"grid points {labels[method]} and {combo} both get the method label {method!r}: "
                "drop --set exp_name or give them distinct labels"
            )
        if "/" in method or method.startswith("."):
            raise SweepError(f"method label {method!r} cannot name a folder (no '/' and no leading '.')")
        labels[method] = combo
        points.append((method, tuple(args), result_settings(parsed)))

    out = Path(out)
    return [
        RunSpec(agent, method, game, seed, args, run_folder(out, method, game, seed), settings)
        for method, args, settings in points
        for game in games
        for seed in seeds
    ]


def conflicts(specs: Sequence[RunSpec]) -> str | None:
    """Runs of the sweep whose folder holds a finished run of other settings, as a refusal naming the
    settings that differ; None when there is none. Such a run is never skipped as if it were done."""
    clashes = [spec for spec in specs if spec.status() == "conflict"]
    if not clashes:
        return None
    spec = clashes[0]
    return (f"{spec.run_dir} holds a finished run of other settings ({'; '.join(spec.differences())})"
            + (f", and {len(clashes) - 1} more run folder(s) likewise" if len(clashes) > 1 else "")
            + "; nothing was run: give this sweep another --out, or --set exp_name=NAME to keep its runs in "
            "their own folders")  # fmt: skip


# Agents whose command line takes several games and seeds, run in one process (rlplastic.batched).
PACKABLE_AGENTS = ("drq",)


def check_packable(agents: Collection[str], size: int) -> None:
    """--pack above 1 needs agents whose command line runs several (game, seed) in one process."""
    if size > 1 and any(agent not in PACKABLE_AGENTS for agent in agents):
        raise SweepError(f"--pack {size}: only {', '.join(PACKABLE_AGENTS)} runs several (game, seed) in one process")


def pack_specs(specs: Sequence[RunSpec], size: int) -> list[tuple[RunSpec, ...]]:
    """The runs in packs of at most `size` that one process runs together (agents/drq.py --env-id
    A B --seed 1 2): runs of one agent and grid point, games that have the same seeds to run going
    together, size // (their seeds) games a pack (the seeds split when alone they exceed size), and
    interrupted runs apart from new ones. A pack is a product of games and seeds, as the agent's
    command line expands it."""
    if size <= 1:
        return [(spec,) for spec in specs]
    check_packable({spec.agent for spec in specs}, size)
    groups: dict[tuple, dict[str, list[RunSpec]]] = {}
    for spec in specs:
        # interrupted runs pack apart from new ones: a pack resumes together, from one step
        key = (spec.agent, spec.method, spec.args, spec.status())
        groups.setdefault(key, {}).setdefault(spec.game, []).append(spec)
    packs = []
    for by_game in groups.values():
        by_seeds: dict[tuple[int, ...], list[list[RunSpec]]] = {}
        for runs in by_game.values():
            by_seeds.setdefault(tuple(run.seed for run in runs), []).append(runs)
        for seeds, games in by_seeds.items():
            for first_seed in range(0, len(seeds), size):
                chunk = set(seeds[first_seed : first_seed + size])
                per_pack = max(1, size // len(chunk))
                for first_game in range(0, len(games), per_pack):
                    packs.append(tuple(run for runs in games[first_game : first_game + per_pack]
                                       for run in runs if run.seed in chunk))  # fmt: skip
    return packs


def pack_games_and_seeds(pack: Sequence[RunSpec]) -> tuple[list[str], list[str]]:
    """The games and the seeds of a pack, each once, in order: the pack is their product."""
    return list(dict.fromkeys(s.game for s in pack)), list(dict.fromkeys(str(s.seed) for s in pack))


def pack_command(pack: Sequence[RunSpec]) -> list[str]:
    """One process for the runs of a pack: its games and seeds, each run's folder by template."""
    if len(pack) == 1:
        return pack[0].command()
    first = pack[0]
    games, seeds = pack_games_and_seeds(pack)
    folders = first.run_dir.parent.parent / "{game}" / "seed{seed}"  # OUT/METHOD/GAME/seedN, as alone
    return [sys.executable, str(agent_path(first.agent)), *first.args, "--env-id", *games, "--seed", *seeds,
            "--output-dir", str(folders)]  # fmt: skip


def pack_log(pack: Sequence[RunSpec]) -> Path:
    if len(pack) == 1:
        return pack[0].log_path
    games, seeds = pack_games_and_seeds(pack)
    return pack[0].run_dir.parent.parent / f"pack_{'-'.join(games)}_seeds{'-'.join(seeds)}.log"


def parse_agent_args(module, agent: str, args: Sequence[str]):
    """The agent's Args for these arguments, validated by the agent; errors name the arguments."""
    import tyro

    try:
        parsed = tyro.cli(module.Args, args=list(args), prog=f"{agent}.py")
    except SystemExit:
        raise SweepError(f"{agent}: arguments {' '.join(args) or '(none)'} rejected (tyro's message above)") from None
    problems = module.validate(parsed)
    if problems:
        raise SweepError(f"{agent} {' '.join(args)}: invalid arguments:\n  " + "\n  ".join(problems))
    return parsed


@dataclass
class Outcome:
    spec: RunSpec
    returncode: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and (self.spec.run_dir / "results.json").exists()


def run_logged(command: Sequence[str], log_path: str, env: dict | None = None) -> int:
    """Run one agent command with stdout and stderr appended to log_path; the return code."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        log.flush()
        return subprocess.run(list(command), stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def exit_code_path(log_path: str | Path) -> Path:
    """Where a slurm job leaves its run's return code: beside its log, as plain text."""
    return Path(f"{log_path}.exit")


def run_logged_and_recorded(command: Sequence[str], log_path: str) -> int:
    """run_logged, then the return code written atomically beside the log (exit_code_path): what a
    launcher waiting on a slurm job reads, instead of unpickling submitit's result file."""
    returncode = run_logged(command, log_path)
    atomic_write(exit_code_path(log_path), lambda f: f.write(f"{returncode}\n".encode()))
    return returncode


def read_exit_code(log_path: str | Path) -> int | None:
    """The return code a finished job left (run_logged_and_recorded); None if it left none (killed
    before the run ended) or not a number."""
    try:
        return int(exit_code_path(log_path).read_text().strip())
    except (OSError, ValueError):
        return None


def run_local(
    specs: Sequence[RunSpec], workers: int = 1, gpus: Sequence[str] = (), stream: TextIO = sys.stdout, pack: int = 1
) -> list[Outcome]:
    """Run the specs in `workers` parallel processes, `pack` runs to a process at most (pack_specs).
    With gpus, each worker slot gets one of them through CUDA_VISIBLE_DEVICES (slots share GPUs
    round robin when there are more workers)."""
    if workers < 1:
        raise SweepError(f"--workers {workers}: must be >= 1")
    packs = pack_specs(specs, pack)
    slots: Queue[int] = Queue()
    for slot in range(workers):
        slots.put(slot)
    done = []

    def launch(runs: tuple[RunSpec, ...]) -> list[Outcome]:
        slot = slots.get()
        try:
            env = dict(os.environ)
            # N runs each spawning a thread per core oversubscribe the CPU (2 runs on 2 cores ran
            # 2x slower each than with one thread apiece); share the cores out unless told otherwise
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
            start = time.time()
            returncode = run_logged(pack_command(runs), str(pack_log(runs)), env)
            return [Outcome(spec, returncode, time.time() - start) for spec in runs]
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(launch, runs) for runs in packs]
        try:
            for future in as_completed(futures):
                for outcome in future.result():  # collected here, in the launching thread only
                    done.append(outcome)
                    report_outcome(outcome, len(done), len(specs), stream)
        except KeyboardInterrupt:
            for future in futures:
                future.cancel()
            raise
    return done


def report_outcome(outcome: Outcome, index: int, total: int, stream: TextIO) -> None:
    spec = outcome.spec
    what = f"{spec.method} {spec.game} seed {spec.seed}"
    if outcome.ok:
        print(f"[{index}/{total}] done   {what} in {outcome.seconds:.0f}s -> {spec.run_dir}", file=stream, flush=True)
    else:
        print(
            f"[{index}/{total}] FAILED {what} (exit {outcome.returncode}); log: {spec.log_path}",
            file=stream,
            flush=True,
        )


def slurm_executor(
    folder: str | Path,
    partition: str | None = None,
    time_min: int = 24 * 60,
    gpus_per_task: int = 1,
    cpus_per_task: int = 4,
    mem_gb: int = 32,
    array_parallelism: int = 256,
    cluster: str = "slurm",
):
    """A submitit executor with one task per run; cluster local/debug tries a sweep without slurm."""
    import submitit

    try:
        executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster=cluster)
    except RuntimeError as e:  # no srun on this machine
        raise SweepError(f"--launcher slurm: {e} (--submitit-cluster local runs the jobs on this machine)") from None
    params = {"timeout_min": time_min, "cpus_per_task": cpus_per_task, "mem_gb": mem_gb, "name": "rlplastic"}
    if executor.cluster == "slurm":
        params |= {"slurm_array_parallelism": array_parallelism, "gpus_per_node": gpus_per_task}
        if partition:
            params["slurm_partition"] = partition
    executor.update_parameters(**params)
    return executor


JOBS_FILE = "jobs.json"  # in the sweep folder: run folder -> its last slurm job
# slurm states of a job that is still queued or running (sacct's State column)
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}  # fmt: skip


def read_jobs(out: str | Path) -> dict[str, dict]:
    path = Path(out) / JOBS_FILE
    if not path.exists():
        return {}
    try:
        jobs = json.loads(path.read_text())
        if not isinstance(jobs, dict) or not all(isinstance(v, dict) and "job_id" in v for v in jobs.values()):
            raise ValueError("not a map of run folders to jobs")
    except (ValueError, UnicodeDecodeError) as e:
        raise SweepError(
            f"{path} is not this sweep's job record ({e}); move it away to submit every run again"
        ) from None
    return jobs


def record_jobs(out: str | Path, specs: Sequence[RunSpec], jobs, folder: str | Path) -> None:
    """Remember each run's job (id, submitit folder, log) so that a re-run asks slurm before it
    submits the run again."""
    record = read_jobs(out)
    for spec, job in zip(specs, jobs, strict=True):
        record[str(spec.run_dir)] = {"job_id": str(job.job_id), "folder": str(folder), "log": str(spec.log_path)}
    atomic_write(Path(out) / JOBS_FILE, lambda f: f.write(json.dumps(record, indent=2).encode()))


def job_state(job_id: str, folder: str) -> str:
    """slurm's state of a job (sacct, through submitit); UNKNOWN when slurm cannot tell."""
    try:
        import submitit

        return str(submitit.SlurmJob(folder=folder, job_id=job_id).state).split()[0]
    except Exception:  # no sacct, an id slurm forgot: it cannot be shown to be active
        return "UNKNOWN"


def active_jobs(record: dict[str, dict], run_dirs: Sequence[Path]) -> dict[str, str]:
    """{run folder: 'job <id> <STATE>'} for the runs whose job in `record` (read_jobs) is still
    queued or running."""
    active = {}
    for run_dir in map(str, run_dirs):
        if run_dir in record:
            state = job_state(record[run_dir]["job_id"], record[run_dir]["folder"])
            if state in ACTIVE_STATES:
                active[run_dir] = f"job {record[run_dir]['job_id']} {state}"
    return active


def run_slurm(specs: Sequence[RunSpec], executor, wait: bool = False, stream: TextIO = sys.stdout,
              out: str | Path | None = None) -> list[Outcome]:  # fmt: skip
    """Submit the specs as one job array and record their job ids in `out` (the sweep folder). With
    wait, block until the jobs end and return their outcomes; otherwise return none (re-run the sweep
    once they end: finished runs are skipped, queued or running ones are not submitted again)."""
    start = time.time()
    for spec in specs:  # an earlier job's return code must not stand for this one's
        exit_code_path(spec.log_path).unlink(missing_ok=True)
    jobs = executor.map_array(run_logged_and_recorded, [spec.command() for spec in specs],
                              [str(spec.log_path) for spec in specs])  # fmt: skip
    if out is not None:
        record_jobs(out, specs, jobs, executor.folder)
    for spec, job in zip(specs, jobs, strict=True):
        print(f"submitted {spec.method} {spec.game} seed {spec.seed}: job {job.job_id}, log {spec.log_path}",
              file=stream, flush=True)  # fmt: skip
    if not wait:
        return []
    outcomes = []
    for index, (spec, job) in enumerate(zip(specs, jobs, strict=True), start=1):
        # the return code comes from the plain-text file the job wrote; submitit's result file is a
        # pickle, and the launcher unpickles nothing from the sweep folder
        try:
            job.wait()
        except Exception as e:
            print(f"job {job.job_id}: {type(e).__name__}: {e}", file=stream, flush=True)
        returncode = read_exit_code(spec.log_path)
        if returncode is None:  # killed by slurm (time limit, preemption, node failure) before the run ended
            print(f"job {job.job_id} ended without a return code ({job_state(str(job.job_id), str(executor.folder))})",
                  file=stream, flush=True)  # fmt: skip
            returncode = -1
        outcomes.append(Outcome(spec, returncode, time.time() - start))
        report_outcome(outcomes[-1], index, len(specs), stream)
    return outcomes
