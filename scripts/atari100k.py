"""Atari-100k evaluation and sweeps.

  report: aggregates (IQM, median, mean, optimality gap) with stratified-bootstrap CIs, the per-game
          table, probability of improvement and plots, from run folders and/or published score CSVs.
  sweep:  one single-file agent run per (method, game, seed), on local worker processes or slurm.

  python scripts/atari100k.py report runs/ --scores published.csv --compare drq+hare-tortoise drq
  python scripts/atari100k.py report runs/drq --scores published_runs.csv --reproduce drq "DrQ(eps) published"
  python scripts/atari100k.py sweep --agent drq --games all --seeds 1-5 --set ema=0.995 \\
      --grid reset=hare-tortoise,head --out runs/sweep --workers 4 --gpus 0,1
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tyro

from rlplastic import report as reporting
from rlplastic import scores as scoring
from rlplastic import sweep
from rlplastic.agent_files import AgentError
from rlplastic.files import FolderError, atomic_write_json, make_folder


def report(args: Report) -> int:
    if not args.run_dirs and not args.scores:
        raise scoring.ScoreError("give run folders, --scores FILE.csv, or both")
    for name in ("reps", "profile_reps", "improvement_reps", "reproduce_draws"):
        if getattr(args, name) < 1:
            raise scoring.ScoreError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    scores = scoring.screen_protocol(scoring.collect_run_scores(args.run_dirs), args.allow_short)
    for path in args.scores:
        scores += scoring.read_scores_csv(path)
    result = reporting.build_report(
        scores,
        args.out,
        reps=args.reps,
        seed=args.seed,
        compare=[tuple(pair) for pair in args.compare],
        profile_reps=args.profile_reps,
        improvement_reps=args.improvement_reps,
        reproduce=[tuple(pair) for pair in args.reproduce],
        reproduce_draws=args.reproduce_draws,
    )
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        print(result.markdown)
        print(f"\nwritten: {args.out}/report.md, scores.csv, per_game.csv, aggregates.json, aggregates.png, "
              "performance_profile.png (+ curves.png, curves.csv for runs with --eval-every; dynamics.png, "
              "dynamics.csv for runs with diagnostics"
              + (", reproduction.json, reproduction.png" if args.reproduce else "") + ")",
              file=sys.stderr)  # fmt: skip
    for method, games in scoring.thin_games(scores).items():
        print(f"warning: {method} has fewer than {scoring.MIN_RUNS_PER_GAME} runs on {', '.join(games)}: "
              "its confidence intervals are wide and unreliable", file=sys.stderr)  # fmt: skip
    for method in result.matrices.values():
        if method.missing_games:
            print(f"note: {method.method} has no score on {', '.join(method.missing_games)}", file=sys.stderr)
    return 0


def run_sweep(args: Sweep) -> int:
    if args.workers < 1:
        raise sweep.SweepError(f"--workers {args.workers}: must be >= 1")
    games = sweep.parse_games(args.games)
    seeds = sweep.parse_seeds(args.seeds)
    specs = sweep.expand_grid(args.agent, games, seeds, args.out, settings=args.set, grid=args.grid)
    executor = None
    if args.launcher == "slurm" and not args.dry_run:
        executor = sweep.slurm_executor(
            Path(args.out) / "slurm", partition=args.partition, time_min=args.time_min,
            gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb,
            array_parallelism=args.array_parallelism, cluster=args.submitit_cluster,
        )  # fmt: skip
    clash = sweep.conflicts(specs)
    if clash:  # before anything runs, dry run included
        raise sweep.SweepError(clash)
    status = {spec: spec.status() for spec in specs}
    counts = {s: sum(v == s for v in status.values()) for s in ("finished", "diverged", "unfinished", "new")}
    methods = sorted({s.method for s in specs})
    print(f"sweep: {len(specs)} runs ({len(methods)} method(s) x {len(games)} game(s) x {len(seeds)} seed(s)) "
          f"in {args.out}: {counts['finished']} finished (skipped), {counts['diverged']} diverged (skipped), "
          f"{counts['unfinished']} to restart, {counts['new']} new", flush=True)  # fmt: skip
    for spec in specs:
        if status[spec] == "diverged":
            print(f"  diverged before: {spec.method} {spec.game} seed {spec.seed} ({spec.run_dir / 'diverged.json'}): "
                  "not run again; delete that file to retry it", flush=True)  # fmt: skip
    if not args.dry_run:  # before anything runs
        make_folder(args.out, "--out")
    todo = [s for s in specs if status[s] not in ("finished", "diverged")]
    if args.launcher == "slurm":  # never submit a run again while its job is queued or running
        record = sweep.read_jobs(args.out)
        active = sweep.active_jobs(record, [s.run_dir for s in todo])
        for spec in todo:
            if str(spec.run_dir) in active:
                print(f"  still in slurm: {spec.method} {spec.game} seed {spec.seed} ({active[str(spec.run_dir)]}), "
                      "not submitted again", flush=True)  # fmt: skip
            elif str(spec.run_dir) in record:
                print(f"  failed before: {spec.method} {spec.game} seed {spec.seed}, log {spec.log_path}: retried",
                      flush=True)  # fmt: skip
        todo = [s for s in todo if str(s.run_dir) not in active]
    if args.pack > 1 and args.launcher != "local":
        raise sweep.SweepError(f"--pack {args.pack}: packs run with --launcher local (one slurm task per run)")
    sweep.check_packable([args.agent], args.pack)
    if args.dry_run:
        for spec in specs:
            print(f"  {status[spec]:10s} {' '.join(spec.command())}")
        # run_local packs the runs itself; here only to show the packs
        for pack in sweep.pack_specs(todo, args.pack) if args.pack > 1 else []:
            print(f"  pack of {len(pack)}: {' '.join(sweep.pack_command(pack))}")
        return 0
    atomic_write_json(  # after the dry run: a dry run writes nothing
        Path(args.out) / "sweep.json",
        {"argv": sys.argv[1:], "runs": [{"method": s.method, "game": s.game, "seed": s.seed,
                                        "command": s.command(), "run_dir": str(s.run_dir)} for s in specs]},
    )  # fmt: skip
    if not todo:
        if all(status[s] == "finished" for s in specs):
            print("sweep: every run is finished; report with: python scripts/atari100k.py report", args.out)
        elif counts["diverged"]:
            print(f"sweep: nothing to run: every other run is finished or in slurm; {counts['diverged']} diverged")
            return 1
        else:
            print("sweep: nothing to submit: the unfinished runs are still in slurm; run again once they end")
        return 0
    if args.launcher == "local":
        gpus = args.gpus.split(",") if args.gpus else ()
        outcomes = sweep.run_local(todo, workers=args.workers, gpus=gpus, pack=args.pack)
    else:
        outcomes = sweep.run_slurm(todo, executor, wait=args.wait, out=args.out)
        if not args.wait:
            print("sweep: submitted; once the jobs end, run the same command again: finished runs are "
                  "skipped and the rest restart", flush=True)  # fmt: skip
            return 0
    failed = [o for o in outcomes if not o.ok]
    print(f"sweep: {len(outcomes) - len(failed)} run(s) finished, {len(failed)} failed", flush=True)
    for outcome in failed:
        s = outcome.spec
        print(f"  FAILED {s.method} {s.game} seed {s.seed} (exit {outcome.returncode}): {s.log_path}", flush=True)
    return 1 if failed else 0


@dataclass
class Report:
    """Aggregates, per-game table and plots from runs and/or score CSVs."""

    run_dirs: tyro.conf.Positional[list[str]] = field(default_factory=list)
    """folders searched for results.json (recursively)"""
    scores: tyro.conf.UseAppendAction[list[str]] = field(default_factory=list)
    """CSV with columns method,game,seed,score (seed empty for a per-game mean); repeatable"""
    out: str = "atari100k_report"
    """folder for report.md, CSVs and plots"""
    json: bool = False
    """print the aggregates as JSON instead of Markdown"""
    reps: int = 50_000
    """bootstrap reps of the aggregate CIs (rliable: 50,000)"""
    profile_reps: int = 2_000
    """bootstrap reps of the performance profiles"""
    improvement_reps: int = 2_000
    """bootstrap reps of the probability of improvement"""
    seed: int = 0
    """seed of the bootstrap"""
    allow_short: bool = False
    """let runs through that are not full Atari-100k runs (100k steps, 100 evaluation episodes),
    marked [smoke] in every table; refused otherwise"""
    compare: tyro.conf.UseAppendAction[list[tuple[str, str]]] = field(default_factory=list)
    """X Y: probability that method X improves on method Y; repeatable"""
    reproduce: tyro.conf.UseAppendAction[list[tuple[str, str]]] = field(default_factory=list)
    """X Y: do X's runs look like Y's (a reimplementation against the published runs of the agent it
    implements)? Per-game shares of Y's runs below X's, P(X > Y) and IQM against sets of runs drawn from
    Y itself, with p-values; Y needs per-run scores (2 more per game than X has); repeatable"""
    reproduce_draws: int = 10_000
    """sets of runs drawn from Y for --reproduce"""


@dataclass
class Sweep:
    """Run an agent over games x seeds x grid points."""

    agent: str = "drq"
    """agents/<AGENT>.py"""
    games: str = "all"
    """'all' (the 26 games) or names separated by commas"""
    seeds: str = "1-5"
    """seeds: 1-5, 1,3,7 or 1-3,8"""
    set: tyro.conf.UseAppendAction[list[str]] = field(default_factory=list)
    """KEY=VALUE agent argument for every run: reset='hare-tortoise redo', ema=0.995; repeatable"""
    grid: tyro.conf.UseAppendAction[list[str]] = field(default_factory=list)
    """KEY=V1,V2 agent argument to sweep over (each value a method; an empty value = the default); repeatable"""
    out: str = "runs/sweep"
    """sweep folder: OUT/METHOD/GAME/seedN per run"""
    launcher: Literal["local", "slurm"] = "local"
    dry_run: bool = False
    """print each run's status and command, launch nothing"""
    workers: int = 1
    """local: processes at a time"""
    pack: int = 1
    """local, drq: runs of one method in one process at most (--env-id A B --seed 1 2: one batched update
    on a GPU); games with the same seeds go together"""
    gpus: str = ""
    """local: GPU ids the worker slots take in turn, e.g. 0,1,2,3"""
    partition: str | None = None
    """slurm: partition"""
    time_min: int = 24 * 60
    """slurm: time limit per run in minutes"""
    gpus_per_task: int = 1
    """slurm: GPUs per run"""
    cpus_per_task: int = 4
    """slurm: CPUs per run"""
    mem_gb: int = 32
    """slurm: memory per run"""
    array_parallelism: int = 256
    """slurm: array tasks running at once"""
    wait: bool = False
    """slurm: wait for the jobs and report failures"""
    submitit_cluster: Literal["slurm", "local", "debug"] = "slurm"
    """submitit executor: slurm, or local/debug to try a slurm sweep on this machine"""


def main(argv: list[str] | None = None) -> int:
    args = tyro.extras.subcommand_cli_from_dict({"report": Report, "sweep": Sweep}, args=argv, description=__doc__)
    command = "report" if isinstance(args, Report) else "sweep"
    try:
        return report(args) if command == "report" else run_sweep(args)
    except (scoring.ScoreError, sweep.SweepError, AgentError, FolderError) as e:
        print(f"atari100k {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
