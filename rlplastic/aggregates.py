"""The aggregates papers report on Atari-100k (rliable, Agarwal et al. 2021): IQM, median, mean and
optimality gap with stratified-bootstrap confidence intervals, probability of improvement and
performance profiles. The bootstrap is rliable's; the point estimates are also written out here in
plain numpy so tests can check one against the other."""

from __future__ import annotations

import numpy as np

from rlplastic.scores import MethodScores, ScoreError

AGGREGATES = ("iqm", "median", "mean", "og")
AGGREGATE_TITLES = {"iqm": "IQM", "median": "Median", "mean": "Mean", "og": "Optimality gap"}


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
