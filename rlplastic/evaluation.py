"""Atari-100k scoring the way papers do it (rliable, Agarwal et al. 2021).

Scores come from run folders (every results.json below them) or from CSV files of published
results; they are human-normalized with the reference random/human scores, arranged per method as a
runs x games matrix, and summarized by IQM, median, mean and optimality gap with stratified-bootstrap
confidence intervals, performance profiles and probability of improvement. The bootstrap is
rliable's; the point estimates are also written out here in plain numpy so tests can check one
against the other.
"""

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

AGGREGATES = ("iqm", "median", "mean", "og")
AGGREGATE_TITLES = {"iqm": "IQM", "median": "Median", "mean": "Mean", "og": "Optimality gap"}
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


ATARI100K_STEPS = 100_000  # agent steps of training
ATARI100K_EVAL_EPISODES = 100  # episodes of the final evaluation
SMOKE_MARK = " [smoke]"  # appended to the method of off-protocol runs let through with allow_short
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
    run's method (its --exp-name, or the agent's default label)."""
    scores = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise ScoreError(f"{run_dir}: not a folder")
        for path in sorted(run_dir.rglob("results.json")):
            try:
                results = json.loads(path.read_text())
                method = results.get("method") or results["config"]["exp_name"]
                game, seed, score = results["game"], results["seed"], results["eval_mean"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ScoreError(f"{path}: not a results.json of an agent run ({type(e).__name__}: {e})") from None
            if score is None:
                raise ScoreError(f"{path}: eval_mean is null (the run evaluated no episode)")
            where = str(path)
            scores.append(
                Score(
                    str(method), parse_game(game, where), int(seed), parse_score(str(score), where), where,
                    off_protocol=protocol_problem(results), curve=parse_curve(results.get("eval_curve"), where),
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


def plot_curves(curves: dict[str, dict[str, list[tuple[int, float, int]]]], path: str | Path) -> None:
    """One panel per game: each method's mean evaluation return against agent steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlplastic.runs import atomic_write

    games = sorted({game for per_game in curves.values() for game in per_game})
    cols = min(4, len(games))
    rows = -(-len(games) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, game in zip(axes.flat, games, strict=False):
        for method, per_game in curves.items():
            if game in per_game:
                steps, values, _ = zip(*per_game[game], strict=True)
                ax.plot([s / 1000 for s in steps], values, marker="o", label=method)
        ax.set_title(game)
        ax.set_xlabel("agent steps (k)")
        ax.set_ylabel("eval return")
    for ax in list(axes.flat)[len(games) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


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


# The aggregates of rliable, in plain numpy: the tests hold rliable's numbers against these.
def iqm(scores: np.ndarray) -> float:
    """Mean of the middle 50% of all runs x games scores pooled (25% trimmed from each end)."""
    pooled = np.sort(scores, axis=None)
    cut = int(0.25 * pooled.size)  # scipy.stats.trim_mean rounds the cut down the same way
    return float(pooled[cut : pooled.size - cut].mean())


def median(scores: np.ndarray) -> float:
    """Median over games of the per-game mean score."""
    return float(np.median(scores.mean(axis=0)))


def mean(scores: np.ndarray) -> float:
    """Mean over games of the per-game mean score."""
    return float(scores.mean(axis=0).mean())


def optimality_gap(scores: np.ndarray, gamma: float = 1.0) -> float:
    """How far runs fall short of gamma (human level), scores above it counting as gamma."""
    return float(gamma - np.minimum(scores, gamma).mean())


def point_estimates(scores: np.ndarray) -> dict[str, float]:
    return {"iqm": iqm(scores), "median": median(scores), "mean": mean(scores), "og": optimality_gap(scores)}


def _rliable_aggregates(scores: np.ndarray) -> np.ndarray:
    from rliable import metrics

    return np.array(
        [
            metrics.aggregate_iqm(scores),
            metrics.aggregate_median(scores),
            metrics.aggregate_mean(scores),
            metrics.aggregate_optimality_gap(scores),
        ]
    )


def _seed_numpy(seed: int) -> None:
    # rliable's stratified bootstraps draw their indices from numpy's global generator (their
    # random_state argument never reaches the draws), so that is the one to seed.
    np.random.seed(seed)


def interval_estimates(
    matrices: dict[str, np.ndarray], reps: int = 50_000, seed: int = 0, confidence: float = 0.95
) -> dict[str, dict]:
    """method -> {"iqm", "median", "mean", "og", "ci": {name: [lo, hi]}} by rliable's stratified
    bootstrap (runs resampled within each game, percentile intervals)."""
    from rliable import library as rly

    out = {}
    for method, scores in matrices.items():
        _seed_numpy(seed)
        # one bootstrap per method for all four aggregates, so their CIs come from the same resamples
        points, intervals = rly.get_interval_estimates(
            {method: scores}, _rliable_aggregates, reps=reps, confidence_interval_size=confidence
        )  # fmt: skip
        point, interval = points[method], intervals[method]
        out[method] = {name: float(point[i]) for i, name in enumerate(AGGREGATES)}
        out[method]["ci"] = {name: [float(interval[0, i]), float(interval[1, i])] for i, name in enumerate(AGGREGATES)}
    return out


def probability_of_improvement(
    x: MethodScores, y: MethodScores, reps: int = 2_000, seed: int = 0, confidence: float = 0.95
) -> dict:
    """P(X > Y): per game the Mann-Whitney U statistic / (n_x n_y), averaged over the games both
    methods have, with a stratified independent bootstrap CI (rliable)."""
    from rliable import library as rly
    from rliable import metrics

    games = [g for g in x.games if g in y.games]
    if not games:
        raise ScoreError(f"{x.method} and {y.method} share no game: no probability of improvement")
    sx = x.normalized[:, [x.games.index(g) for g in games]]
    sy = y.normalized[:, [y.games.index(g) for g in games]]
    _seed_numpy(seed)
    key = f"{x.method},{y.method}"
    points, intervals = rly.get_interval_estimates(
        {key: [sx, sy]}, metrics.probability_of_improvement, reps=reps, confidence_interval_size=confidence
    )  # fmt: skip
    lo, hi = np.ravel(intervals[key])
    return {"x": x.method, "y": y.method, "p": float(points[key]), "ci": [float(lo), float(hi)], "games": len(games)}


PROFILE_TAUS = np.linspace(0.0, 2.0, 201)


def performance_profiles(
    matrices: dict[str, np.ndarray], reps: int = 2_000, seed: int = 0, taus: np.ndarray = PROFILE_TAUS
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Score distributions: the share of runs x games with normalized score > tau, with CIs."""
    from rliable import library as rly

    _seed_numpy(seed)
    return rly.create_performance_profile(matrices, taus, reps=reps)


def per_game_means(matrices: dict[str, MethodScores], reference: dict[str, tuple[float, float]]) -> list[dict]:
    """One row per game: random, human and each method's mean raw score (None where missing)."""
    rows = []
    for game, (random, human) in reference.items():
        row = {"game": game, "random": random, "human": human}
        for method, m in matrices.items():
            row[method] = float(m.raw[:, m.games.index(game)].mean()) if game in m.games else None
        rows.append(row)
    return rows


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    def cell(v) -> str:
        if v is None:
            return "—"
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def format_estimate(value: float, ci: Sequence[float]) -> str:
    return f"{value:.3f} ({ci[0]:.3f}, {ci[1]:.3f})"


def plot_interval_estimates(estimates: dict[str, dict], path: str | Path) -> None:
    """The four aggregates with their CIs, one panel each, methods as rows (rliable's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(estimates)
    fig, axes = plt.subplots(1, 4, figsize=(14, 0.6 * len(methods) + 1.4), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes, AGGREGATES, strict=True):
        for i, method in enumerate(methods):
            lo, hi = estimates[method]["ci"][name]
            color = colors[i % len(colors)]
            ax.barh(i, hi - lo, left=lo, height=0.6, color=color, alpha=0.75)
            ax.vlines(estimates[method][name], i - 0.3, i + 0.3, color="k", linewidth=1.5)
        ax.set_title(AGGREGATE_TITLES[name])
        ax.set_xlabel("human-normalized score")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(methods)), methods)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_performance_profiles(
    profiles: dict[str, np.ndarray], cis: dict[str, np.ndarray], path: str | Path, taus: np.ndarray = PROFILE_TAUS
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, profile in profiles.items():
        (line,) = ax.plot(taus, profile, label=method)
        ax.fill_between(taus, cis[method][0], cis[method][1], color=line.get_color(), alpha=0.2)
    ax.set_xlabel(r"human-normalized score $\tau$")
    ax.set_ylabel(r"fraction of runs with score $> \tau$")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    from rlplastic.runs import atomic_write

    def write(f) -> None:
        import io

        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(["" if v is None else v for v in row] for row in rows)
        f.write(text.getvalue().encode())

    atomic_write(path, write)


@dataclass
class Report:
    matrices: dict[str, MethodScores]
    estimates: dict[str, dict]
    improvements: list[dict]
    markdown: str

    def as_json(self) -> dict:
        """{"METHOD": {"iqm", "median", "mean", "og", "ci": {...}, "games": n}} (+ runs, missing games)."""
        return {
            method: est | {"games": len(self.matrices[method].games), "runs": self.matrices[method].runs,
                           "missing_games": self.matrices[method].missing_games}
            for method, est in self.estimates.items()
        }  # fmt: skip


def build_report(
    scores: Sequence[Score],
    out_dir: str | Path,
    reps: int = 50_000,
    seed: int = 0,
    compare: Sequence[tuple[str, str]] = (),
    profile_reps: int = 2_000,
    improvement_reps: int = 2_000,
    reference: dict[str, tuple[float, float]] | None = None,
) -> Report:
    """Aggregates, per-game table, probability of improvement and plots, written into out_dir:
    report.md, scores.csv, per_game.csv, aggregates.json, aggregates.png, performance_profile.png, and
    curves.png / curves.csv when runs evaluated during training (--eval-every)."""
    from rlplastic.runs import atomic_write, atomic_write_json

    reference = reference or reference_scores()
    if not scores:
        raise ScoreError("no scores: no results.json below the run folders and no --scores rows")
    matrices = score_matrices(scores, reference)
    for x, y in compare:
        for name in (x, y):
            if name not in matrices:
                raise ScoreError(f"--compare {x} {y}: no method {name!r}; methods: {', '.join(matrices)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    estimates = interval_estimates({m: s.normalized for m, s in matrices.items()}, reps=reps, seed=seed)
    improvements = [
        probability_of_improvement(matrices[x], matrices[y], reps=improvement_reps, seed=seed) for x, y in compare
    ]
    profiles, profile_cis = performance_profiles(
        {m: s.normalized for m, s in matrices.items()}, reps=profile_reps, seed=seed
    )
    plot_interval_estimates(estimates, out_dir / "aggregates.png")
    plot_performance_profiles(profiles, profile_cis, out_dir / "performance_profile.png")

    methods = list(matrices)
    game_header = ["game", "random", "human", *methods]
    game_rows = [[row[k] for k in game_header] for row in per_game_means(matrices, reference)]
    _write_csv(out_dir / "per_game.csv", game_header, game_rows)
    _write_csv(
        out_dir / "scores.csv",
        ["method", "game", "seed", "score", "normalized"],
        [[s.method, s.game, s.seed, s.score, human_normalized(s.game, s.score, reference)] for s in scores],
    )
    report = Report(matrices, estimates, improvements, "")
    atomic_write_json(out_dir / "aggregates.json", report.as_json())

    md = ["# Atari-100k report", ""]
    md += [f"Human-normalized aggregates, 95% stratified-bootstrap CIs ({reps:,} reps, seed {seed}, rliable).", ""]
    md.append(
        markdown_table(
            ["method", "runs", "games", *(AGGREGATE_TITLES[a] for a in AGGREGATES)],
            [[m, matrices[m].runs, len(matrices[m].games), *(format_estimate(e[a], e["ci"][a]) for a in AGGREGATES)]
             for m, e in estimates.items()],
        )
    )  # fmt: skip
    md += ["", "![aggregates](aggregates.png)", "", "![performance profile](performance_profile.png)", ""]
    curves = mean_curves(scores)
    if curves:  # runs evaluated during training (--eval-every): sample-efficiency curves
        plot_curves(curves, out_dir / "curves.png")
        _write_csv(
            out_dir / "curves.csv", ["method", "game", "step", "mean", "runs"],
            [[m, g, step, value, n] for m, per_game in curves.items() for g, points in per_game.items()
             for step, value, n in points],
        )  # fmt: skip
        md += ["## Evaluation during training", "", "![sample-efficiency curves](curves.png)", ""]
    notes = []
    for m, games in thin_games(scores).items():
        notes.append(f"- {m}: fewer than {MIN_RUNS_PER_GAME} runs on {', '.join(games)}: wide, unreliable CIs")
    for m, s in matrices.items():
        if m.endswith(SMOKE_MARK):
            notes.append(f"- {m}: not full Atari-100k runs (short training or evaluation): not comparable")
        if s.missing_games:
            notes.append(f"- {m}: no score on {len(s.missing_games)} game(s): {', '.join(s.missing_games)}")
        if s.runs == 1:
            notes.append(f"- {m}: one score per game (per-game means?): its CIs are points, not uncertainty")
        if s.dropped:
            listed = ", ".join(f"{d.game} seed {d.seed}" for d in s.dropped)
            notes.append(f"- {m}: {len(s.dropped)} run(s) left out to keep {s.runs} run(s) per game: {listed}")
    if notes:
        md += ["## Notes: runs per game, missing games, left-out runs", "", *notes, ""]
    if improvements:
        md += ["## Probability of improvement", ""]
        md.append(
            markdown_table(
                ["X", "Y", "P(X > Y)", "games"],
                [[i["x"], i["y"], format_estimate(i["p"], i["ci"]), i["games"]] for i in improvements],
            )
        )
        md += ["", f"95% CIs from {improvement_reps:,} stratified independent bootstrap reps.", ""]
    md += ["## Per-game mean raw score", ""]
    md.append(markdown_table(game_header, game_rows))
    md.append("")
    report.markdown = "\n".join(md)
    atomic_write(out_dir / "report.md", lambda f: f.write(report.markdown.encode()))
    return report
