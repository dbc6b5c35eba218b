"""The Atari-100k report: aggregates table, per-game table, probability of improvement, plots
(rliable's plot_utils) and sample-efficiency curves, written atomically into one folder."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rlplastic.aggregates import (
    AGGREGATE_TITLES,
    AGGREGATES,
    PROFILE_TAUS,
    interval_estimates,
    performance_profiles,
    probability_of_improvement,
    reproduction_check,
)
from rlplastic.scores import (
    DYNAMICS,
    MIN_RUNS_PER_GAME,
    SMOKE_MARK,
    MethodScores,
    Score,
    ScoreError,
    dynamics_bands,
    human_normalized,
    mean_curves,
    per_game_means,
    reference_scores,
    score_matrices,
    thin_games,
)


def _panels(count: int, max_cols: int, width: float):
    """A figure of `count` panels, at most `max_cols` a row: (figure, its axes in reading order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(max_cols, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 2.8 * rows), squeeze=False)
    return fig, list(axes.flat)


def _save_panels(fig, axes: list, used: int, path: str | Path) -> None:
    """Blank the panels past the first `used`, put the legend on the first, write the PNG atomically."""
    import matplotlib.pyplot as plt

    from rlplastic.files import atomic_write

    for ax in axes[used:]:
        ax.axis("off")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def plot_curves(curves: dict[str, dict[str, list[tuple[int, float, int]]]], path: str | Path) -> None:
    """One panel per game: each method's mean evaluation return against agent steps."""
    games = sorted({game for per_game in curves.values() for game in per_game})
    fig, axes = _panels(len(games), 4, 3.6)
    for ax, game in zip(axes, games, strict=False):
        for method, per_game in curves.items():
            if game in per_game:
                steps, values, _ = zip(*per_game[game], strict=True)
                ax.plot([s / 1000 for s in steps], values, marker="o", label=method)
        ax.set_title(game)
        ax.set_xlabel("agent steps (k)")
        ax.set_ylabel("eval return")
    _save_panels(fig, axes, len(games), path)


def plot_dynamics(bands: dict[str, dict[str, list[tuple[int, float, float, float, int]]]], path: str | Path) -> None:
    """One panel per measure (the diagnostics, then the interventions' activity): each method's mean
    over its runs against agent steps, its range over the runs shaded."""
    measures = [name for name in DYNAMICS if any(name in per_measure for per_measure in bands.values())]
    fig, axes = _panels(len(measures), 3, 3.8)
    for ax, name in zip(axes, measures, strict=False):
        for method, per_measure in bands.items():
            if name in per_measure:
                steps, means, lows, highs, _ = zip(*per_measure[name], strict=True)
                x = [step / 1000 for step in steps]
                (line,) = ax.plot(x, means, label=method)
                ax.fill_between(x, lows, highs, color=line.get_color(), alpha=0.2)
        ax.set_title(DYNAMICS[name], fontsize=9)
        ax.set_xlabel("agent steps (k)")
    _save_panels(fig, axes, len(measures), path)


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
    """The four aggregates with their CIs, one panel each, methods as rows: rliable's own figure
    (plot_utils.plot_interval_estimates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import plot_utils

    points = {m: np.array([e[a] for a in AGGREGATES]) for m, e in estimates.items()}
    intervals = {m: np.array([e["ci"][a] for a in AGGREGATES]).T for m, e in estimates.items()}  # (2, metrics)
    # rliable sizes the figure by rows and places the axis label in figure coordinates: keep it
    # about 0.55 inch below the axes whatever the number of methods
    row_height = max(0.45, 1.2 / len(estimates))
    fig, _ = plot_utils.plot_interval_estimates(
        points, intervals, metric_names=[AGGREGATE_TITLES[a] for a in AGGREGATES], algorithms=list(estimates),
        xlabel="Human-normalized score", row_height=row_height,
        xlabel_y_coordinate=-0.55 / (row_height * len(estimates)),
    )  # fmt: skip
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_performance_profiles(
    profiles: dict[str, np.ndarray], cis: dict[str, np.ndarray], path: str | Path, taus: np.ndarray = PROFILE_TAUS
) -> None:
    """Score distributions with their CIs: rliable's plot_utils.plot_performance_profiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import plot_utils

    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_utils.plot_performance_profiles(
        profiles, taus, performance_profile_cis=cis, ax=ax, xlabel=r"Human-normalized score ($\tau$)",
    )  # fmt: skip
    ax.legend(loc="upper right")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    from rlplastic.files import atomic_write

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
    common_games: list[str] = field(default_factory=list)  # when the methods cover different games
    common_estimates: dict[str, dict] = field(default_factory=dict)  # the aggregates over those alone
    reproductions: list[dict] = field(default_factory=list)  # reproduction_check of each --reproduce pair

    def as_json(self) -> dict:
        """{"METHOD": {"iqm", "median", "mean", "og", "ci": {...}, "games": n}} (+ runs, missing games,
        and "on_common_games": the same over the games every method has, when their games differ)."""
        return {
            method: est | {"games": len(self.matrices[method].games), "runs": self.matrices[method].runs,
                           "missing_games": self.matrices[method].missing_games}
            | ({"on_common_games": self.common_estimates[method] | {"games": self.common_games}}
               if self.common_estimates else {})
            for method, est in self.estimates.items()
        }  # fmt: skip


def plot_reproduction(check: dict, path: str | Path) -> None:
    """One panel per game of a reproduction_check: Y's runs as dots (spread sideways so that equal
    scores stay visible), X's runs as red diamonds, the share of Y's runs below X's and its p-value in
    the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlplastic.files import atomic_write

    games = check["games"]
    cols = min(5, len(games))
    rows = -(-len(games) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    jitter = np.random.default_rng(0)
    for ax, game in zip(axes.flat, games, strict=False):
        row = check["per_game"][game]
        reference = np.array(row["reference_scores"])
        ax.scatter(jitter.uniform(-0.3, 0.3, len(reference)), reference, s=6, color="0.55", label=check["y"])
        ax.scatter(np.zeros(len(row["scores"])), row["scores"], s=60, marker="D", color="tab:red", zorder=3,
                   label=check["x"])  # fmt: skip
        ax.set_title(f"{game}\n{row['share_below']:.2f} below, p {row['p_value']:.2g}", fontsize=9)
        ax.set_xticks([])
        ax.set_xlim(-0.6, 0.6)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(games) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel("final score")
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def reproduction_figure_name(index: int) -> str:
    return "reproduction.png" if index == 0 else f"reproduction_{index + 1}.png"


def reproduction_markdown(check: dict, figure: str | None = None) -> list[str]:
    """The report's section for one reproduction_check."""
    x, y, draws = check["x"], check["y"], check["draws"]
    lines = [f"## Reproduction check: {x} against {y}", "",
             f"Do the runs of X = {x} look like runs of Y = {y}? Per game, the share of Y's runs that X's runs "
             f"beat (ties count one half; 0.5 is the middle of Y's spread); then three statistics over the "
             f"{len(check['games'])} games both have, against {draws:,} sets of as many runs per game drawn from "
             "Y itself (each scored against the rest of Y's runs): the range 95% of those sets fall in, and a "
             "two-sided p-value. The third statistic, each run's distance from the middle of Y's runs averaged over "
             "runs and games, is large when X's runs land in Y's tails more often than Y's own runs do, in either "
             "direction (games off upwards and downwards, which P(X > Y) averages away, or runs spread wider "
             "than Y's).", ""]  # fmt: skip
    lines.append(markdown_table(
        ["statistic", "X", "sets drawn from Y: 95% range", "p-value"],
        [[title, f"{check[key]['value']:.3f}", "[{:.3f}, {:.3f}]".format(*check[key]["null_95"]),
          f"{check[key]['p_value']:.3f}"]
         for key, title in (("p_improvement", "P(X > Y)"), ("iqm", "IQM (human-normalized)"),
                            ("tails", "|share − ½| of X's runs (tails; about ¼ for runs of Y)"))],
    ))  # fmt: skip
    lines += [""] + ([f"![reproduction check]({figure})", ""] if figure else [])
    lines += [
        "Per game, the share's own 95% range and p-value come from the same sets drawn from Y; the "
        "Holm-adjusted p-value is the one to read across games (below 0.05 there, a game's runs are unlikely "
        "runs of Y even after looking at every game; some game's own p-value falls below 0.05 by chance in "
        f"about {1 - 0.95 ** len(check['games']):.0%} of checks over {len(check['games'])} games).",
        "",
    ]
    lines += [markdown_table(
        ["game", "X runs", "share of Y's runs below X's", "sets drawn from Y: 95% range", "p-value",
         "Holm-adjusted", "Y runs", "Y mean", "Y median"],
        [[game, ", ".join(f"{s:g}" for s in row["scores"]), f"{row['share_below']:.2f}",
          "[{:.2f}, {:.2f}]".format(*row["null_95"]), f"{row['p_value']:.3f}", f"{row['p_holm']:.3f}",
          row["reference_runs"], f"{row['reference_mean']:.1f}", f"{row['reference_median']:.1f}"]
         for game, row in check["per_game"].items()],
    ), ""]  # fmt: skip
    return lines


def common_games(matrices: dict[str, MethodScores]) -> list[str]:
    """The games every method has, when the methods do not all cover the same games (else [])."""
    game_sets = [set(m.games) for m in matrices.values()]
    if len(game_sets) < 2 or all(games == game_sets[0] for games in game_sets):
        return []
    first = next(iter(matrices.values())).games
    return [g for g in first if all(g in games for games in game_sets)]


def build_report(
    scores: Sequence[Score],
    out_dir: str | Path,
    reps: int = 50_000,
    seed: int = 0,
    compare: Sequence[tuple[str, str]] = (),
    profile_reps: int = 2_000,
    improvement_reps: int = 2_000,
    reference: dict[str, tuple[float, float]] | None = None,
    reproduce: Sequence[tuple[str, str]] = (),
    reproduce_draws: int = 10_000,
) -> Report:
    """Aggregates, per-game table, probability of improvement and plots, written into out_dir:
    report.md, scores.csv, per_game.csv, aggregates.json, aggregates.png, performance_profile.png, and
    curves.png / curves.csv when runs evaluated during training (--eval-every); dynamics.png /
    dynamics.csv when they recorded diagnostics or interventions' activity; with `reproduce`
    pairs (X, Y), whether X's runs look like Y's (reproduction_check), also in reproduction.json and
    reproduction.png (reproduction_2.png, ... for more pairs)."""
    from rlplastic.files import atomic_write, atomic_write_json, make_folder

    reference = reference or reference_scores()
    if not scores:
        raise ScoreError("no scores: no results.json below the run folders and no --scores rows")
    matrices = score_matrices(scores, reference)
    for flag, pairs in (("--compare", compare), ("--reproduce", reproduce)):
        for x, y in pairs:
            for name in (x, y):
                if name not in matrices:
                    raise ScoreError(f"{flag} {x} {y}: no method {name!r}; methods: {', '.join(matrices)}")
    reproductions = [reproduction_check(matrices[x], matrices[y], reference, reproduce_draws, seed)
                     for x, y in reproduce]  # fmt: skip
    out_dir = make_folder(out_dir, "--out")  # FolderError names it

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
    common = common_games(matrices)
    common_estimates = interval_estimates(
        {m: s.normalized[:, [s.games.index(g) for g in common]] for m, s in matrices.items()}, reps=reps, seed=seed
    ) if common else {}  # fmt: skip
    report = Report(matrices, estimates, improvements, "", common, common_estimates, reproductions)
    atomic_write_json(out_dir / "aggregates.json", report.as_json())
    if reproductions:
        atomic_write_json(out_dir / "reproduction.json", reproductions)

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
    if common:  # aggregates over different game sets do not compare: the same over the shared games
        md += ["## On the games every method has", "",
               f"The methods cover different games, so the aggregates above are over different sets. Over the "
               f"{len(common)} game(s) every method has ({', '.join(common)}):", ""]  # fmt: skip
        md.append(
            markdown_table(
                ["method", "runs", "games", *(AGGREGATE_TITLES[a] for a in AGGREGATES)],
                [[m, matrices[m].runs, len(common), *(format_estimate(e[a], e["ci"][a]) for a in AGGREGATES)]
                 for m, e in common_estimates.items()],
            )
        )  # fmt: skip
        md.append("")
    bands = dynamics_bands(scores)
    if bands:  # runs that recorded diagnostics (or interventions' activity) during training
        plot_dynamics(bands, out_dir / "dynamics.png")
        _write_csv(
            out_dir / "dynamics.csv", ["method", "measure", "step", "mean", "min", "max", "runs"],
            [[m, name, *point] for m, per_measure in bands.items() for name, points in per_measure.items()
             for point in points],
        )  # fmt: skip
    curves = mean_curves(scores)
    if curves:  # runs evaluated during training (--eval-every): sample-efficiency curves
        plot_curves(curves, out_dir / "curves.png")
        _write_csv(
            out_dir / "curves.csv", ["method", "game", "step", "mean", "runs"],
            [[m, g, step, value, n] for m, per_game in curves.items() for g, points in per_game.items()
             for step, value, n in points],
        )  # fmt: skip
        md += ["## Evaluation during training", "", "![sample-efficiency curves](curves.png)", ""]
    if bands:
        md += ["## Plasticity and interventions during training", "",
               "Each method's mean over its runs (all games), its range over them shaded: dormant units, "
               "ranks, weight magnitude and distance from init (the runs' diagnostics), and what the "
               "interventions did (cumulative counts).", "", "![training dynamics](dynamics.png)", ""]  # fmt: skip
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
            notes.append(f"- {m}: {len(s.dropped)} run(s) left out of the aggregates to keep {s.runs} run(s) per "
                         f"game: {listed} (the per-game means below count them)")  # fmt: skip
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
    for index, check in enumerate(reproductions):
        plot_reproduction(check, out_dir / reproduction_figure_name(index))
        md += reproduction_markdown(check, reproduction_figure_name(index))
    md += ["## Per-game mean raw score", ""]
    md.append(markdown_table(game_header, game_rows))
    md.append("")
    report.markdown = "\n".join(md)
    atomic_write(out_dir / "report.md", lambda f: f.write(report.markdown.encode()))
    return report
