"""The aggregates papers report on Atari-100k (rliable, Agarwal et al. 2021): IQM, median, mean and
optimality gap with stratified-bootstrap confidence intervals, probability of improvement and
performance profiles. The bootstrap is rliable's; the point estimates are also written out here in
plain numpy so tests can check one against the other."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlplastic.scores import MethodScores, ScoreError, human_normalized

AGGREGATES = ("iqm", "median", "mean", "og")
AGGREGATE_TITLES = {"iqm": "IQM", "median": "Median", "mean": "Mean", "og": "Optimality gap"}


# The aggregates of rliable, in plain numpy: the tests hold rliable's numbers against these.
def _iqm_rows(pooled: np.ndarray) -> np.ndarray:
    """The IQM of each row of (..., scores): the mean of its middle 50% (25% trimmed from each end)."""
    ordered = np.sort(pooled, axis=-1)
    cut = int(0.25 * ordered.shape[-1])  # scipy.stats.trim_mean rounds the cut down the same way
    return ordered[..., cut : ordered.shape[-1] - cut].mean(axis=-1)


def iqm(scores: np.ndarray) -> float:
    """Mean of the middle 50% of all runs x games scores pooled (25% trimmed from each end)."""
    return float(_iqm_rows(np.ravel(scores)))


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


def _run_shares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per run of x, the share of y's runs below it, ties counting one half: x (..., k), y (..., n) ->
    (..., k). Their mean over x's runs is the Mann-Whitney U statistic over n_x n_y."""
    greater = (x[..., :, None] > y[..., None, :]).mean(axis=-1)
    equal = (x[..., :, None] == y[..., None, :]).mean(axis=-1)
    return greater + 0.5 * equal


def reproduction_check(
    x: MethodScores,
    y: MethodScores,
    reference: dict[str, tuple[float, float]],
    draws: int = 10_000,
    seed: int = 0,
) -> dict:
    """Do X's runs look like runs of Y? For a reimplementation (X, a few runs per game) against the
    published runs of the agent it implements (Y, many per game), over the games both have, with
    every run of each (also those a score matrix leaves out to keep its games even).

    Three statistics of X: P(X > Y), the share of Y's runs that X's runs beat, ties one half (per game,
    then averaged over games: probability_of_improvement's point estimate), which is 1/2 when X's runs
    come from Y's distribution; the IQM of X's human-normalized scores; and how far X's runs sit from
    the middle of Y's, |share - 1/2| per run averaged over runs and games (1/4 for runs of Y: a run's
    share is uniform on [0, 1]), which is large when X's runs land in Y's tails more often than Y's
    own runs do, in either direction: a difference P(X > Y) cannot see when games off upwards and
    games off downwards cancel, or a few runs per game spread wider than Y's. Their distribution under
    that hypothesis comes from Y itself: `draws` times, as many runs per game as X has are drawn from
    Y without replacement and scored against the rest of Y. The p-values are two-sided Monte Carlo
    ones, (1 + draws as extreme) / (1 + draws) on each side, doubled. The per-game shares say where
    each game's runs sit among Y's; each has its own p-value against the same draws of that game, and a
    Holm-adjusted one (Holm 1979), which keeps the chance of any false alarm over all the games at the
    level read (a game's own p-value alone does not: with 9 games, one below 0.05 comes by chance 37%
    of the time)."""
    games = [g for g in x.games if g in y.games]
    if not games:
        raise ScoreError(f"{x.method} and {y.method} share no game: no reproduction check")
    raw_x, raw_y = ({g: _all_runs(m, g) for g in games} for m in (x, y))
    xs, ys = ({g: human_normalized(g, raw[g], reference) for g in games} for raw in (raw_x, raw_y))
    short = [f"{g} ({len(ys[g])} for {len(xs[g])})" for g in games if len(ys[g]) < len(xs[g]) + 2]
    if short:
        raise ScoreError(f"reproduction check of {x.method} against {y.method}: {y.method} needs 2 runs more per "
                         f"game than {x.method} has (its runs drawn from it, 2 left to compare them with); it has "
                         f"fewer on {', '.join(short)}: per-game means cannot say how runs spread")  # fmt: skip
    run_shares = [_run_shares(xs[g], ys[g]) for g in games]
    per_game = np.array([r.mean() for r in run_shares])
    observed = {"p_improvement": float(per_game.mean()), "iqm": iqm(np.concatenate(list(xs.values()))),
                "tails": float(np.mean([np.abs(r - 0.5).mean() for r in run_shares]))}  # fmt: skip

    rng = np.random.default_rng(seed)
    shares, tails, pseudo_runs = [], [], []
    for g in games:  # per game: draws x (as many of Y's runs as X has, drawn; the rest of Y's)
        k, n = len(xs[g]), len(ys[g])
        drawn = ys[g][rng.permuted(np.broadcast_to(np.arange(n), (draws, n)), axis=-1)]
        drawn_shares = _run_shares(drawn[:, :k], drawn[:, k:])
        shares.append(drawn_shares.mean(axis=-1))
        tails.append(np.abs(drawn_shares - 0.5).mean(axis=-1))
        pseudo_runs.append(drawn[:, :k])
    null = {"p_improvement": np.mean(shares, axis=0), "iqm": _iqm_rows(np.concatenate(pseudo_runs, axis=1)),
            "tails": np.mean(tails, axis=0)}  # fmt: skip
    result = {"x": x.method, "y": y.method, "games": games, "draws": draws}
    for name, value in observed.items():
        result[name] = {"value": value, "null_95": [float(q) for q in np.quantile(null[name], [0.025, 0.975])],
                        "p_value": _two_sided_p(null[name], value)}  # fmt: skip
    game_p = [_two_sided_p(null_shares, share) for null_shares, share in zip(shares, per_game, strict=True)]
    result["per_game"] = {
        g: {"scores": raw_x[g].tolist(), "share_below": float(share), "p_value": p, "p_holm": p_holm,
            "null_95": [float(q) for q in np.quantile(null_shares, [0.025, 0.975])],
            "reference_runs": len(raw_y[g]), "reference_mean": float(raw_y[g].mean()),
            "reference_median": float(np.median(raw_y[g])), "reference_scores": raw_y[g].tolist()}
        for g, share, null_shares, p, p_holm in zip(games, per_game, shares, game_p, holm(game_p), strict=True)
    }  # fmt: skip
    return result


def _two_sided_p(null: np.ndarray, value: float) -> float:
    """Two-sided Monte Carlo p-value of `value` among the draws `null`: (1 + draws as extreme) /
    (1 + draws) on each side, the smaller doubled."""
    low = (1 + np.sum(null <= value)) / (1 + len(null))
    high = (1 + np.sum(null >= value)) / (1 + len(null))
    return float(min(1.0, 2 * min(low, high)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (Holm 1979): the i-th smallest of m p-values times (m - i + 1),
    made non-decreasing in that order and capped at 1. Rejecting where the adjusted value is below
    alpha keeps the chance of any false rejection at most alpha."""
    order = np.argsort(p_values, kind="stable")
    m = len(p_values)
    adjusted = np.minimum(1.0, np.maximum.accumulate([(m - i) * p_values[j] for i, j in enumerate(order)]))
    out = np.empty(m)
    out[order] = adjusted
    return [float(a) for a in out]


def _all_runs(m: MethodScores, game: str) -> np.ndarray:
    """Every run's raw score of `m` on `game`, those left out of its matrix included."""
    return np.array(m.raw[:, m.games.index(game)].tolist() + [d.score for d in m.dropped if d.game == game])
