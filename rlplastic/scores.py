"""Atari-100k scores: read from run folders (every results.json below them) or from CSV files of
published results, screened against the protocol, human-normalized with the reference random /
human scores, and arranged per method as a runs x games matrix."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np

from rlplastic.envs.atari import canonical_game

CSV_COLUMNS = ("method", "game", "seed", "score")


class ScoreError(ValueError):
    """Bad score input; the message names the file (and line) at fault."""


@dataclass(frozen=True)
class Score:
    """One run's final score on one game, or a published per-game mean when seed is None."""

    method: str
    game: str
    seed: int | None
    score: float
    source: str  # "path:line" for CSV rows, the results.json path for runs
    off_protocol: str | None = None  # why a run is not a full Atari-100k run (None: it is)
    curve: tuple[tuple[int, float], ...] = ()  # (agent step, eval mean) of every evaluation of the run
    # (agent step, {measure: value}): the run's plasticity diagnostics and its interventions' activity
    # (results.json "diagnostics" and "activity"), for the report's training-dynamics figure
    dynamics: tuple[tuple[int, dict[str, float]], ...] = ()


ATARI100K_STEPS = 100_000  # agent steps of training
ATARI100K_EVAL_EPISODES = 100  # episodes of the final evaluation
SMOKE_MARK = " [smoke]"  # appended to the method of off-protocol runs let through with allow_short
# appended to the method of runs whose episodes started with noop frames (dopamine's 2021 runner,
# --noop-unit frames) rather than agent steps: a protocol variant, never pooled with the default
FRAME_NOOPS_MARK = " [frame noops]"
MIN_RUNS_PER_GAME = 5  # fewer runs per game than this makes the CIs unreliable (Agarwal et al. 2021)


def protocol_problem(results: dict) -> str | None:
    """Why a run's results.json is not a full Atari-100k run (100k agent steps, a final evaluation
    of 100 episodes), or None."""
    problems = []
    steps = results.get("total_steps")
    if steps != ATARI100K_STEPS:
        problems.append(f"total_steps {steps} (Atari-100k: {ATARI100K_STEPS:,})")
    episodes = len(results.get("eval_returns") or [])
    if episodes < ATARI100K_EVAL_EPISODES:
        problems.append(f"{episodes} evaluation episodes (Atari-100k: {ATARI100K_EVAL_EPISODES})")
    return "; ".join(problems) or None


def reference_scores(path: str | Path | None = None) -> dict[str, tuple[float, float]]:
    """game -> (random, human), from the TSV shipped with the package (rliable/dopamine/BBF values)."""
    text = (
        Path(path).read_text()
        if path
        else resources.files("rlplastic").joinpath("data/atari100k_scores.tsv").read_text()
    )
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    return {row["game"]: (float(row["random"]), float(row["human"])) for row in rows}


def human_normalized(game: str, score: float, reference: dict[str, tuple[float, float]]) -> float:
    random, human = reference[game]
    return (score - random) / (human - random)


def parse_game(name: str, where: str) -> str:
    try:
        return canonical_game(name)
    except ValueError as e:
        raise ScoreError(f"{where}: {e}") from None


def read_scores_csv(path: str | Path) -> list[Score]:
    """Rows of method,game,seed,score; seed may be empty for a published per-game mean."""
    path = Path(path)
    if not path.is_file():
        raise ScoreError(f"{path}: no such file")
    scores = []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise ScoreError(f"{path}:1: header {header} lacks column(s) {missing}; need {','.join(CSV_COLUMNS)}")
        col = {name: header.index(name) for name in CSV_COLUMNS}
        for line, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path}:{line}"
            if len(row) < len(header):
                raise ScoreError(f"{where}: {len(row)} fields, the header has {len(header)}")
            method, game, seed, score = (row[col[c]].strip() for c in CSV_COLUMNS)
            if not method:
                raise ScoreError(f"{where}: empty method")
            scores.append(
                Score(method, parse_game(game, where), parse_seed(seed, where), parse_score(score, where), where)
            )
    return scores


def parse_seed(text: str, where: str) -> int | None:
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ScoreError(f"{where}: seed {text!r} is not an integer (leave it empty for a per-game mean)") from None


def parse_score(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ScoreError(f"{where}: score {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ScoreError(f"{where}: score {text!r} is not finite")
    return value


def collect_run_scores(run_dirs: Iterable[str | Path]) -> list[Score]:
    """The final evaluation mean of every results.json below the given folders, labelled with the
    run's method (its --exp-name, or the agent's default label), FRAME_NOOPS_MARK appended for runs
    played with --noop-unit frames."""
    scores = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise ScoreError(f"{run_dir}: not a folder")
        for path in sorted(run_dir.rglob("results.json")):
            try:
                results = json.loads(path.read_text())
                if not isinstance(results, dict):
                    raise TypeError(f"a JSON {type(results).__name__}, not an object")
                method = results.get("method") or results["config"]["exp_name"]
                if (results.get("config") or {}).get("noop_unit") == "frames":
                    method = f"{method}{FRAME_NOOPS_MARK}"
                game, seed, score = results["game"], results["seed"], results["eval_mean"]
                if isinstance(seed, bool) or not isinstance(seed, int):
                    raise TypeError(f"seed {seed!r} is not an integer")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise ScoreError(f"{path}: not a results.json of an agent run ({type(e).__name__}: {e})") from None
            if score is None:
                raise ScoreError(f"{path}: eval_mean is null (the run evaluated no episode)")
            where = str(path)
            scores.append(
                Score(
                    str(method), parse_game(game, where), seed, parse_score(str(score), where), where,
                    off_protocol=protocol_problem(results), curve=parse_curve(results.get("eval_curve"), where),
                    dynamics=parse_dynamics(results.get("diagnostics"), results.get("activity")),
                )
            )  # fmt: skip
    return scores


def parse_curve(points, where: str) -> tuple[tuple[int, float], ...]:
    """A results.json's eval_curve ([{"step", "mean", ...}]) as (step, mean) pairs."""
    if not points:
        return ()
    try:
        curve = tuple((int(p["step"]), parse_score(str(p["mean"]), where)) for p in points if p["mean"] is not None)
    except (KeyError, TypeError, ValueError) as e:
        raise ScoreError(f"{where}: eval_curve is not a list of {{step, mean}} points ({e})") from None
    return curve


# What the report draws over training: the measures plasticity papers plot (whole network), then
# what the interventions did (cumulative counts the agents record at each report).
DYNAMICS = {
    "dormant_0.1/all": "dormant units (tau 0.1)", "effective_rank/all": "effective rank",
    "stable_rank/all": "stable rank", "weight_magnitude/all": "weight magnitude",
    "distance_from_init/all": "distance from init",
    "interventions/hare_tortoise/resets": "hare <- tortoise resets",
    "interventions/head_reset/resets": "head resets",
    "interventions/shrink_perturb/resets": "shrink & perturb resets",
    "interventions/re_do/recycled": "units recycled (ReDo)",
    "interventions/continual_backprop/replaced": "units replaced (CBP)",
    "interventions/bbf_resets/resets": "BBF resets",
}  # fmt: skip


def parse_dynamics(diagnostics, activity) -> tuple[tuple[int, dict[str, float]], ...]:
    """A results.json's diagnostics and activity rows ({"step", measure: value}) merged by step, the
    DYNAMICS measures only; malformed rows are left out (the figure is descriptive)."""
    by_step: dict[int, dict[str, float]] = defaultdict(dict)
    for rows, prefix in ((diagnostics, ""), (activity, "interventions/")):
        for row in rows if isinstance(rows, list) else []:
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                continue
            for key, value in row.items():
                name = prefix + key
                if name in DYNAMICS and isinstance(value, int | float) and math.isfinite(value):
                    by_step[row["step"]][name] = float(value)
    return tuple((step, by_step[step]) for step in sorted(by_step) if by_step[step])


def dynamics_bands(scores: Sequence[Score]) -> dict[str, dict[str, list[tuple[int, float, float, float, int]]]]:
    """{method: {measure: [(step, mean, min, max, runs)]}} over every run of the method (all games),
    for the measures some run recorded at two steps or more."""
    values: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for s in scores:
        for step, measures in s.dynamics:
            for name, value in measures.items():
                values[s.method][name][step].append(value)
    bands = {
        method: {name: [(step, float(np.mean(v)), float(min(v)), float(max(v)), len(v))
                        for step, v in sorted(steps.items())]
                 for name, steps in per_measure.items() if len(steps) > 1}
        for method, per_measure in values.items()
    }  # fmt: skip
    return {method: per_measure for method, per_measure in bands.items() if per_measure}


def mean_curves(scores: Sequence[Score]) -> dict[str, dict[str, list[tuple[int, float, int]]]]:
    """{method: {game: [(step, mean over the runs evaluated at that step, runs)]}} of the runs
    that evaluated during training (--eval-every), for sample-efficiency curves."""
    by_step: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for s in scores:
        for step, value in s.curve:
            by_step[s.method][s.game][step].append(value)
    curves = {
        method: {game: [(step, float(np.mean(v)), len(v)) for step, v in sorted(steps.items())]
                 for game, steps in per_game.items() if len(steps) > 1}
        for method, per_game in by_step.items()
    }  # fmt: skip
    return {method: per_game for method, per_game in curves.items() if per_game}  # a final point alone is no curve


def screen_protocol(scores: Sequence[Score], allow_short: bool = False) -> list[Score]:
    """Refuse runs that are not full Atari-100k runs, naming each and why; with allow_short, let
    them through with SMOKE_MARK on their method, so every table shows them apart."""
    short = [s for s in scores if s.off_protocol]
    if short and not allow_short:
        listed = "\n  ".join(f"{s.source}: {s.off_protocol}" for s in short)
        raise ScoreError(
            f"{len(short)} run(s) are not full Atari-100k runs and would not compare with published scores:"
            f"\n  {listed}\n(--allow-short lets them through, marked{SMOKE_MARK} in every table)"
        )
    return [replace(s, method=s.method + SMOKE_MARK) if s.off_protocol else s for s in scores]


def thin_games(scores: Sequence[Score], min_runs: int = MIN_RUNS_PER_GAME) -> dict[str, list[str]]:
    """Per method, the games with fewer than min_runs seeded runs (per-game means are not runs)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for s in scores:
        if s.seed is not None:
            counts[s.method][s.game] += 1
    return {
        method: [f"{game} ({n})" for game, n in sorted(per_game.items()) if n < min_runs]
        for method, per_game in counts.items()
        if any(n < min_runs for n in per_game.values())
    }


def check_duplicates(scores: Sequence[Score]) -> None:
    """Two scores for the same method, game and seed are an error naming both sources."""
    seen: dict[tuple, Score] = {}
    for s in scores:
        key = (s.method, s.game, s.seed)
        if key in seen:
            seed = "no seed (per-game mean)" if s.seed is None else f"seed {s.seed}"
            raise ScoreError(
                f"{s.source}: duplicate score for {s.method} / {s.game} / {seed}, first at {seen[key].source}"
            )
        seen[key] = s


@dataclass
class MethodScores:
    """One method's runs x games matrices, with what was left out said out loud."""

    method: str
    games: list[str]
    raw: np.ndarray  # runs x games
    normalized: np.ndarray  # runs x games
    missing_games: list[str] = field(default_factory=list)
    dropped: list[Score] = field(default_factory=list)  # runs beyond the fewest any game has

    @property
    def runs(self) -> int:
        return self.raw.shape[0]


def score_matrices(
    scores: Sequence[Score], reference: dict[str, tuple[float, float]], games: Sequence[str] | None = None
) -> dict[str, MethodScores]:
    """Per method, a runs x games matrix over the games it has (sorted by seed within a game).

    rliable's stratified bootstrap needs the same number of runs for every game, so a game with more
    runs than the fewest keeps its lowest seeds; the rest are listed in `dropped`, never lost silently.
    """
    check_duplicates(scores)
    games = list(games or reference)
    by_method: dict[str, dict[str, list[Score]]] = defaultdict(lambda: defaultdict(list))
    for s in scores:
        if s.game not in reference:
            raise ScoreError(f"{s.source}: game {s.game} has no reference random/human score")
        by_method[s.method][s.game].append(s)
    matrices = {}
    for method, per_game in by_method.items():
        present = [g for g in games if g in per_game]
        runs = min(len(per_game[g]) for g in present)
        columns, dropped = [], []
        for g in present:
            ordered = sorted(per_game[g], key=lambda s: (s.seed is None, s.seed or 0))
            columns.append([s.score for s in ordered[:runs]])
            dropped += ordered[runs:]
        raw = np.array(columns, dtype=np.float64).T
        random, human = np.array([reference[g] for g in present]).T
        normalized = (raw - random) / (human - random)
        missing = [g for g in games if g not in per_game]
        matrices[method] = MethodScores(method, present, raw, normalized, missing, dropped)
    return matrices


def per_game_means(matrices: dict[str, MethodScores], reference: dict[str, tuple[float, float]]) -> list[dict]:
    """One row per game: random, human and each method's mean raw score over every run it has on
    the game, the runs left out of the aggregates (`dropped`) included (None where missing)."""
    rows = []
    for game, (random, human) in reference.items():
        row = {"game": game, "random": random, "human": human}
        for method, m in matrices.items():
            if game not in m.games:
                row[method] = None
                continue
            kept = m.raw[:, m.games.index(game)].tolist()
            row[method] = float(np.mean(kept + [d.score for d in m.dropped if d.game == game]))
        rows.append(row)
    return rows
