"""Atari-100k scoring and the report: human-normalized scores, aggregates and their bootstrap CIs,
the reproduction check, curves and the report command (rlplastic.scores, aggregates, report)."""

import csv
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from conftest import ROOT
from rlplastic.envs.atari import ATARI100K_GAMES

from rlplastic import aggregates
from rlplastic import report as reporting
from rlplastic import scores as scoring
from rlplastic.scores import Score, ScoreError

# normalized scores, 2 runs x 4 games; by hand:
#   pooled sorted -0.2 0 0.1 0.3 | 0.5 1.0 2.0 3.0 ... IQM drops 2 from each end: (0.1+0.3+0.5+1.0)/4 = 0.475
#   per-game means 0.05 0.4 1.5 1.4 -> median (0.4+1.4)/2 = 0.9, mean 3.35/4 = 0.8375
#   min(x, 1) sums to 3.7 over 8 -> OG 1 - 0.4625 = 0.5375
HAND = np.array([[0.0, 0.5, 2.0, -0.2], [0.1, 0.3, 1.0, 3.0]])
HAND_ANSWERS = {"iqm": 0.475, "median": 0.9, "mean": 0.8375, "og": 0.5375}


def test_own_formulas_on_a_hand_made_matrix():
    assert aggregates.point_estimates(HAND) == pytest.approx(HAND_ANSWERS)


def test_rliable_point_estimates_match_the_hand_answers():
    estimates = aggregates.interval_estimates({"m": HAND}, reps=200, seed=0)["m"]
    assert {k: estimates[k] for k in aggregates.AGGREGATES} == pytest.approx(HAND_ANSWERS)
    for name in aggregates.AGGREGATES:
        lo, hi = estimates["ci"][name]
        assert lo <= estimates[name] + 1e-12 and estimates[name] <= hi + 1e-12


def test_rliable_matches_own_formulas_on_random_matrices():
    rng = np.random.default_rng(3)
    for runs, games in ((1, 26), (5, 26), (3, 7), (10, 4)):
        scores = rng.normal(0.5, 0.8, size=(runs, games))
        ours = aggregates.point_estimates(scores)
        theirs = aggregates.interval_estimates({"m": scores}, reps=50, seed=0)["m"]
        assert {k: theirs[k] for k in aggregates.AGGREGATES} == pytest.approx(ours, abs=1e-12)


def test_bootstrap_ci_of_two_runs_on_one_game_is_exact():
    # resampling 2 runs {0, 1}: mean in {0, 0.5, 1} with probabilities 1/4, 1/2, 1/4 -> the 2.5% and
    # 97.5% percentiles are 0 and 1
    ci = aggregates.interval_estimates({"m": np.array([[0.0], [1.0]])}, reps=4000, seed=1)["m"]["ci"]["mean"]
    assert ci == pytest.approx([0.0, 1.0])
    # identical runs: nothing to resample, the CI collapses onto the point
    flat = aggregates.interval_estimates({"m": np.full((3, 5), 0.7)}, reps=100, seed=1)["m"]
    assert flat["ci"]["iqm"] == pytest.approx([0.7, 0.7])


def own_stratified_bootstrap(scores, statistic, reps, rng):
    runs, games = scores.shape
    draws = [statistic(scores[rng.integers(0, runs, size=(runs, games)), np.arange(games)]) for _ in range(reps)]
    return np.percentile(draws, [2.5, 97.5])


def test_rliable_cis_agree_with_an_own_stratified_bootstrap():
    scores = np.random.default_rng(0).gamma(2.0, 0.4, size=(5, 26))
    theirs = aggregates.interval_estimates({"m": scores}, reps=4000, seed=0)["m"]["ci"]
    rng = np.random.default_rng(1)
    for name, statistic in (("iqm", aggregates.iqm), ("mean", aggregates.mean), ("og", aggregates.optimality_gap)):
        lo, hi = own_stratified_bootstrap(scores, statistic, 4000, rng)
        width = hi - lo
        # two independent 4,000-rep bootstraps: endpoints agree to a few percent of the width
        assert theirs[name][0] == pytest.approx(lo, abs=0.08 * width)
        assert theirs[name][1] == pytest.approx(hi, abs=0.08 * width)


def test_reports_are_reproducible_with_a_seed():
    scores = np.random.default_rng(0).normal(size=(3, 6))
    a = aggregates.interval_estimates({"m": scores}, reps=300, seed=5)
    b = aggregates.interval_estimates({"m": scores}, reps=300, seed=5)
    c = aggregates.interval_estimates({"m": scores}, reps=300, seed=6)
    assert a == b and a != c


def test_reference_scores_are_the_published_ones():
    reference = scoring.reference_scores()
    assert list(reference) == list(ATARI100K_GAMES)
    assert reference["Pong"] == (-20.7, 14.6)
    assert reference["Breakout"] == (1.7, 30.5)
    assert reference["MsPacman"] == (307.3, 6951.6)
    assert scoring.human_normalized("Pong", -20.7, reference) == 0.0
    assert scoring.human_normalized("Pong", 14.6, reference) == pytest.approx(1.0)
    assert scoring.human_normalized("Breakout", 16.1, reference) == pytest.approx(0.5)


def write_csv(path, rows, header=("method", "game", "seed", "score")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_rows_with_and_without_seed(tmp_path):
    path = write_csv(tmp_path / "s.csv", [["DER", "pong", "", "-19.3"], ["mine", "ALE/Pong-v5", "3", "-20"]])
    scores = scoring.read_scores_csv(path)
    assert scores[0] == Score("DER", "Pong", None, -19.3, f"{path}:2")
    assert (scores[1].game, scores[1].seed, scores[1].score) == ("Pong", 3, -20.0)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (["m", "Pongg", "1", "3"], "unknown Atari-100k game 'Pongg'"),
        (["m", "Pong", "1", "three"], "score 'three' is not a number"),
        (["m", "Pong", "1", "nan"], "not finite"),
        (["m", "Pong", "x", "3"], "seed 'x' is not an integer"),
        (["", "Pong", "1", "3"], "empty method"),
    ],
)
def test_csv_errors_name_the_file_and_line(tmp_path, row, message):
    path = write_csv(tmp_path / "bad.csv", [["m", "Breakout", "1", "3"], row])
    with pytest.raises(ScoreError, match=message) as error:
        scoring.read_scores_csv(path)
    assert f"{path}:3" in str(error.value)


def test_csv_without_the_columns_is_an_error(tmp_path):
    path = write_csv(tmp_path / "bad.csv", [["m", "Pong", "3"]], header=("method", "game", "return"))
    with pytest.raises(ScoreError, match=r"bad.csv:1: .*lacks column"):
        scoring.read_scores_csv(path)


def test_duplicate_rows_are_errors_naming_both(tmp_path):
    path = write_csv(tmp_path / "dup.csv", [["m", "Pong", "", "3"], ["m", "Breakout", "", "3"], ["m", "pong", "", "4"]])
    with pytest.raises(ScoreError, match=r"dup.csv:4: duplicate score for m / Pong / no seed.*dup.csv:2"):
        scoring.score_matrices(scoring.read_scores_csv(path), scoring.reference_scores())


def test_matrices_report_missing_games_and_left_out_runs():
    reference = scoring.reference_scores()
    scores = [Score("m", "Pong", s, -20.7 + s, "x") for s in (1, 2, 3)] + [Score("m", "Breakout", 2, 30.5, "y")]
    m = scoring.score_matrices(scores, reference)["m"]
    assert m.games == ["Breakout", "Pong"]  # reference order
    assert m.raw.shape == (1, 2) and m.raw[0].tolist() == [30.5, -19.7]  # the lowest seed of Pong kept
    assert m.normalized[0, 0] == pytest.approx(1.0)
    assert [(d.game, d.seed) for d in m.dropped] == [("Pong", 2), ("Pong", 3)]
    assert len(m.missing_games) == 24 and "Alien" in m.missing_games


def test_probability_of_improvement_by_hand():
    reference = scoring.reference_scores()

    def method(name, per_game):
        scores = [Score(name, g, s, v, "x") for g, values in per_game.items() for s, v in enumerate(values)]
        return scoring.score_matrices(scores, reference)[name]

    # Pong: x = {0, 10} vs y = {5, 5}: U = 2 wins of 4 -> 0.5; Breakout: x always above -> 1.0; mean 0.75
    x = method("x", {"Pong": [0.0, 10.0], "Breakout": [20.0, 21.0], "Alien": [300.0, 400.0]})
    y = method("y", {"Pong": [5.0, 5.0], "Breakout": [2.0, 3.0]})
    result = aggregates.probability_of_improvement(x, y, reps=200, seed=0)
    assert result["p"] == pytest.approx(0.75)
    assert result["games"] == 2
    assert result["ci"][0] <= 0.75 <= result["ci"][1]


def method_scores(name, per_game):
    scores = [Score(name, g, s, v, "x") for g, values in per_game.items() for s, v in enumerate(values)]
    return scoring.score_matrices(scores, scoring.reference_scores())[name]


def test_reproduction_check_by_hand_and_against_rliable():
    """Per game the share of Y's runs below X's (ties one half), every run counted, also those the
    score matrix leaves out to keep its games even; with even runs it is rliable's P(X > Y)."""
    y_runs = {"Pong": [-21.0, -20.0, -19.0, -18.0, -10.0], "Breakout": [1.0, 2.0, 3.0, 4.0, 5.0]}
    x = method_scores("x", {"Pong": [-19.0], "Breakout": [10.0, 0.0]})  # Breakout's second run is left out
    y = method_scores("y", y_runs)
    assert [(d.game, d.score) for d in x.dropped] == [("Breakout", 0.0)]
    check = aggregates.reproduction_check(x, y, scoring.reference_scores(), draws=500, seed=0)
    # Pong: -19 beats 2 of 5, ties 1 -> 2.5 / 5 = 0.5; Breakout: 10 beats all 5, 0 none -> 5 / 10 = 0.5
    assert check["per_game"]["Pong"]["share_below"] == 0.5 and check["per_game"]["Breakout"]["share_below"] == 0.5
    assert check["per_game"]["Breakout"]["scores"] == [10.0, 0.0] and check["p_improvement"]["value"] == 0.5
    # tails: Pong's run in the middle (|0.5 - 0.5| = 0), Breakout's two at the ends (0.5 each) -> (0 + 0.5) / 2
    assert check["tails"]["value"] == 0.25
    even = method_scores("x", {"Pong": [-19.0, -15.0], "Breakout": [10.0, 0.0]})
    rliable = aggregates.probability_of_improvement(even, y, reps=50, seed=0)["p"]
    assert aggregates.reproduction_check(even, y, scoring.reference_scores(), draws=50)["p_improvement"]["value"] == (
        pytest.approx(rliable)
    )  # fmt: skip


def test_reproduction_check_tells_runs_of_the_reference_from_runs_below_it():
    """X drawn from Y's own distribution passes (at about the nominal rate); X a little worse on every
    game does not, by both statistics."""
    rng = np.random.default_rng(0)
    games = ATARI100K_GAMES[:9]
    reference = scoring.reference_scores()
    spread = {g: (reference[g][1] - reference[g][0]) for g in games}  # one human-random gap per game

    def runs(name, count, shift=0.0):
        return method_scores(name, {g: list(reference[g][0] + spread[g] * rng.normal(0.4 + shift, 0.3, count))
                                    for g in games})  # fmt: skip

    y = runs("y", 100)
    checks = [aggregates.reproduction_check(runs("x", 2), y, reference, draws=400, seed=i) for i in range(40)]
    p_values = [check["p_improvement"]["p_value"] for check in checks]
    assert np.mean(np.array(p_values) < 0.05) <= 0.15 and np.median(p_values) > 0.3
    # per game too: a game's own p-value below 0.05 about 5% of the time, Holm's over 9 games rarely at all
    game_p = np.array([[check["per_game"][g]["p_value"] for g in games] for check in checks])
    game_holm = np.array([[check["per_game"][g]["p_holm"] for g in games] for check in checks])
    assert np.mean(game_p < 0.05) <= 0.1 and np.mean(game_p.min(axis=1) < 0.05) >= 0.1
    assert np.mean(game_holm.min(axis=1) < 0.05) <= 0.15 and (game_holm >= game_p).all()
    assert np.mean(np.array([check["tails"]["p_value"] for check in checks]) < 0.05) <= 0.15
    worse = aggregates.reproduction_check(runs("x", 2, shift=-0.3), y, reference, draws=2000, seed=0)
    assert worse["p_improvement"]["value"] < worse["p_improvement"]["null_95"][0]
    assert worse["p_improvement"]["p_value"] < 0.01 and worse["iqm"]["p_value"] < 0.01


def test_reproduction_check_per_game_p_values_find_the_game_that_differs():
    """Three runs below all 100 of Y's on one game: that game's p-value is as small as the draws can
    say and stays below 0.05 after Holm's adjustment; a game whose runs sit in Y's middle does not."""
    rng = np.random.default_rng(1)
    y = method_scores("y", {"Pong": list(rng.uniform(-20, 0, 100)), "Breakout": list(rng.uniform(0, 30, 100))})
    x = method_scores("x", {"Pong": [-21.0, -20.5, -20.9], "Breakout": [14.0, 15.0, 16.0]})
    check = aggregates.reproduction_check(x, y, scoring.reference_scores(), draws=2000, seed=0)
    pong, breakout = check["per_game"]["Pong"], check["per_game"]["Breakout"]
    assert pong["share_below"] == 0.0 and pong["p_value"] == pytest.approx(2 / 2001)
    assert pong["p_holm"] == pytest.approx(2 * pong["p_value"]) and pong["null_95"][0] > 0.0
    assert breakout["p_value"] > 0.3 and breakout["p_holm"] == breakout["p_value"]  # the larger: times 1, then the max


def test_reproduction_check_tails_sees_runs_spread_wider_than_the_reference():
    """X's runs one in Y's top tenth and one in its bottom tenth on every game: on average as good as Y
    (P(X > Y) passes), but in Y's tails far more often than Y's own runs are, which the tails
    statistic says."""
    rng = np.random.default_rng(2)
    games = ATARI100K_GAMES[:9]
    y_runs = {g: np.sort(rng.uniform(0.0, 100.0, 100)) for g in games}
    y = method_scores("y", {g: list(v) for g, v in y_runs.items()})
    x = method_scores("x", {g: [float(rng.choice(v[:10])), float(rng.choice(v[90:]))] for g, v in y_runs.items()})
    check = aggregates.reproduction_check(x, y, scoring.reference_scores(), draws=2000, seed=0)
    assert check["p_improvement"]["p_value"] > 0.2
    assert check["tails"]["value"] > 0.4 and check["tails"]["p_value"] < 0.01


def test_holm_adjustment_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.5 -> 4 x 0.01, 3 x 0.03, max(2 x 0.04, 0.09), 0.5; back in the given order
    assert aggregates.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert aggregates.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0]) and aggregates.holm([]) == []


def test_reproduction_check_needs_the_references_runs_not_its_means():
    x = method_scores("x", {"Pong": [-19.0]})
    means = method_scores("published", {"Pong": [-15.0]})
    with pytest.raises(ScoreError, match=r"published needs 2 runs more per game than x has .* Pong \(1 for 1\)"):
        aggregates.reproduction_check(x, means, scoring.reference_scores())
    with pytest.raises(ScoreError, match="share no game"):
        aggregates.reproduction_check(x, method_scores("y", {"Breakout": [1.0, 2.0, 3.0]}), scoring.reference_scores())


def write_results(path, method, game, seed, eval_mean, total_steps=100_000, episodes=100, curve=(), config=None):
    path.mkdir(parents=True)
    payload = {"agent": "drq", "method": method, "game": game, "seed": seed, "eval_mean": eval_mean,
               "config": config or {},
               "total_steps": total_steps, "eval_returns": [eval_mean] * episodes,
               "eval_curve": [{"step": step, "mean": mean, "returns": [mean]} for step, mean in curve]}  # fmt: skip
    (path / "results.json").write_text(json.dumps(payload))


def test_report_from_run_folders_writes_every_output(tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        write_results(runs / "a" / f"pong{seed}", "drq", "Pong", seed, -20.0 + seed)
        write_results(runs / "a" / f"breakout{seed}", "drq", "Breakout", seed, 5.0 * seed)
        write_results(runs / "b" / f"pong{seed}", "drq+head", "Pong", seed, -10.0)
    write_results(runs / "c" / "pong1", "drq", "Pong", 1, -5.0, config={"noop_unit": "frames"})  # a protocol variant
    write_results(runs / "c" / "pong2", "drq", "Pong", 2, -5.0, config={"noop_unit": "agent-steps"})
    scores = scoring.collect_run_scores([runs])
    assert [s.method for s in scores if "/c/" in s.source] == ["drq [frame noops]", "drq"]
    scores = [s for s in scores if "/c/" not in s.source]
    report = reporting.build_report(scores, tmp_path / "out", reps=100, profile_reps=50, compare=[("drq+head", "drq")])
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"report.md", "scores.csv", "per_game.csv", "aggregates.json", "aggregates.png"} <= files
    assert "performance_profile.png" in files
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert len(rows) == 6
    pong = next(r for r in rows if r["method"] == "drq" and r["game"] == "Pong" and r["seed"] == "1")
    assert float(pong["normalized"]) == pytest.approx((-19.0 + 20.7) / (14.6 + 20.7))
    per_game = {r["game"]: r for r in csv.DictReader(open(tmp_path / "out" / "per_game.csv"))}
    assert float(per_game["Breakout"]["drq"]) == 7.5 and per_game["Breakout"]["drq+head"] == ""
    summary = json.loads((tmp_path / "out" / "aggregates.json").read_text())
    assert summary["drq"]["games"] == 2 and summary["drq+head"]["games"] == 1
    assert summary["drq"]["mean"] == pytest.approx(aggregates.mean(report.matrices["drq"].normalized))
    assert "drq+head: no score on 25 game(s)" in report.markdown
    assert "| drq+head | drq | 1.000" in report.markdown
    # drq has Pong and Breakout, drq+head only Pong: the aggregates again over Pong alone
    assert "Over the 1 game(s) every method has (Pong)" in report.markdown
    on_pong = summary["drq"]["on_common_games"]
    assert on_pong["games"] == ["Pong"] and summary["drq+head"]["on_common_games"]["games"] == ["Pong"]
    pong_only = report.matrices["drq"].normalized[:, [report.matrices["drq"].games.index("Pong")]]
    assert on_pong["mean"] == pytest.approx(aggregates.mean(pong_only)) != summary["drq"]["mean"]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{not json", "JSONDecodeError"),
        ("[1, 2]", "a JSON list, not an object"),  # was an AttributeError traceback
        ('{"method": "drq", "game": "Pong", "seed": "one", "eval_mean": 1.0}', "seed 'one' is not an integer"),
        ('{"method": "drq", "game": "Pong", "seed": 1}', "KeyError"),
    ],
)
def test_broken_results_json_is_named(tmp_path, text, why):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text(text)
    with pytest.raises(ScoreError, match=r"r/results.json: not a results.json of an agent run \(.*" + why):
        scoring.collect_run_scores([tmp_path])


def cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "atari100k.py"), *args], capture_output=True, text=True, timeout=300
    )


def test_cli_json_and_errors(tmp_path):
    rows = [["A", g, s, 100.0 * s + i] for i, g in enumerate(ATARI100K_GAMES[:5]) for s in (1, 2, 3)]
    good = write_csv(tmp_path / "good.csv", rows)
    done = cli(
        "report", "--scores", str(good), "--json", "--reps", "200", "--profile-reps", "20", "--out", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert set(payload["A"]) >= {"iqm", "median", "mean", "og", "ci", "games"}
    assert payload["A"]["games"] == 5 and len(payload["A"]["ci"]["iqm"]) == 2

    bad = write_csv(tmp_path / "bad.csv", [["A", "Pong", "1", "1"], ["A", "Tetris", "1", "2"]])
    done = cli("report", "--scores", str(bad), "--out", str(tmp_path / "x"))
    assert done.returncode == 2
    assert f"{bad}:3" in done.stderr and "Tetris" in done.stderr
    assert not (tmp_path / "x").exists()  # nothing written before the input is known to be good

    done = cli("report", "--scores", str(good), "--compare", "A", "Z", "--out", str(tmp_path / "y"))
    assert done.returncode == 2 and "no method 'Z'" in done.stderr

    # --reproduce: a section of the report and reproduction.json; a per-game-means reference is refused
    many = write_csv(tmp_path / "many.csv", [["B", g, s, 100.0 * s + i] for i, g in enumerate(ATARI100K_GAMES[:5])
                                             for s in range(1, 21)])  # fmt: skip
    done = cli("report", "--scores", str(good), "--scores", str(many), "--reproduce", "A", "B", "--reproduce-draws",
               "300", "--reps", "100", "--profile-reps", "10", "--out", str(tmp_path / "r"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "## Reproduction check: A against B" in done.stdout and "| P(X > Y) |" in done.stdout
    assert "![reproduction check](reproduction.png)" in done.stdout
    assert (tmp_path / "r" / "reproduction.png").stat().st_size > 0
    check = json.loads((tmp_path / "r" / "reproduction.json").read_text())[0]
    assert check["x"] == "A" and check["y"] == "B" and len(check["games"]) == 5 and check["draws"] == 300
    assert all({"p_value", "p_holm", "null_95"} <= set(row) for row in check["per_game"].values())
    assert "| Holm-adjusted |" in done.stdout
    done = cli("report", "--scores", str(many), "--scores", str(good), "--reproduce", "B", "A", "--out",
               str(tmp_path / "z"))  # fmt: skip
    assert done.returncode == 2 and "A needs 2 runs more per game than B has" in done.stderr
    assert not (tmp_path / "z").exists()


def test_report_refuses_runs_that_are_not_full_atari100k_runs(tmp_path):
    runs = tmp_path / "runs"
    for seed in range(1, 6):
        write_results(runs / f"full{seed}", "drq", "Pong", seed, -15.0)
    write_results(runs / "short", "drq", "Boxing", 1, 3.0, total_steps=3_000)
    write_results(runs / "few_episodes", "drq", "Boxing", 2, 4.0, episodes=10)
    done = cli("report", str(runs), "--out", str(tmp_path / "refused"))
    assert done.returncode == 2 and not (tmp_path / "refused").exists()
    assert "2 run(s) are not full Atari-100k runs" in done.stderr
    assert f"{runs / 'short' / 'results.json'}: total_steps 3000 (Atari-100k: 100,000)" in done.stderr
    assert f"{runs / 'few_episodes' / 'results.json'}: 10 evaluation episodes (Atari-100k: 100)" in done.stderr

    done = cli(
        "report", str(runs), "--allow-short", "--reps", "100", "--profile-reps", "10", "--out", str(tmp_path / "r")
    )
    assert done.returncode == 0, done.stderr
    assert "| drq [smoke] | 2 | 1 |" in done.stdout and "| drq | 5 | 1 |" in done.stdout  # apart in every table
    per_game = next(csv.DictReader(open(tmp_path / "r" / "per_game.csv"))).keys()
    assert "drq [smoke]" in per_game
    # a game with fewer than 5 runs is warned about, on stderr and in the report
    assert "warning: drq [smoke] has fewer than 5 runs on Boxing (2)" in done.stderr
    assert "warning: drq has" not in done.stderr
    assert "drq [smoke]: fewer than 5 runs on Boxing (2)" in (tmp_path / "r" / "report.md").read_text()


def test_runs_that_evaluated_during_training_get_sample_efficiency_curves(tmp_path):
    runs = tmp_path / "runs"
    for seed, offset in ((1, 0.0), (2, 2.0)):
        curve = [(50_000, -20.0 + offset), (100_000, -10.0 + offset)]
        write_results(runs / f"pong{seed}", "drq", "Pong", seed, -10.0 + offset, curve=curve)
    write_results(runs / "boxing", "drq", "Boxing", 1, 5.0)  # no curve: only its final point
    scores = scoring.collect_run_scores([runs])
    report = reporting.build_report(scores, tmp_path / "out", reps=100, profile_reps=10)
    rows = list(csv.DictReader(open(tmp_path / "out" / "curves.csv")))
    assert [(r["game"], int(r["step"]), float(r["mean"]), int(r["runs"])) for r in rows] == [
        ("Pong", 50_000, -19.0, 2),
        ("Pong", 100_000, -9.0, 2),
    ]
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0 and "curves.png" in report.markdown
    # runs whose curve is their final point alone (no --eval-every) draw no curves
    only_final = [s for s in scores if s.game == "Boxing"] + [
        replace(s, curve=s.curve[-1:]) for s in scores if s.game == "Pong"
    ]
    report = reporting.build_report(only_final, tmp_path / "flat", reps=100, profile_reps=10)
    assert not (tmp_path / "flat" / "curves.png").exists() and "curves.png" not in report.markdown

    write_results(runs / "broken", "drq", "Pong", 3, 1.0)
    broken = json.loads((runs / "broken" / "results.json").read_text()) | {"eval_curve": [{"step": 1}]}
    (runs / "broken" / "results.json").write_text(json.dumps(broken))
    with pytest.raises(ScoreError, match="broken/results.json: eval_curve"):
        scoring.collect_run_scores([runs])


def test_per_game_means_count_the_runs_the_aggregates_leave_out(tmp_path):
    """rliable needs as many runs on every game, so the aggregates keep the fewest (lowest seeds);
    the per-game mean of a game with more runs is over all of them."""
    runs = tmp_path / "runs"
    for seed in (1, 2, 3):
        write_results(runs / f"breakout{seed}", "drq", "Breakout", seed, 5.0 * seed)
    write_results(runs / "pong1", "drq", "Pong", 1, -19.0)
    report = reporting.build_report(scoring.collect_run_scores([runs]), tmp_path / "out", reps=100, profile_reps=50)
    drq = report.matrices["drq"]
    assert drq.runs == 1 and drq.raw[0, drq.games.index("Breakout")] == 5.0 and len(drq.dropped) == 2
    per_game = {r["game"]: r for r in csv.DictReader(open(tmp_path / "out" / "per_game.csv"))}
    assert float(per_game["Breakout"]["drq"]) == 10.0 and float(per_game["Pong"]["drq"]) == -19.0
    assert "2 run(s) left out of the aggregates to keep 1 run(s) per game" in report.markdown
    assert "| Breakout | 1.7 | 30.5 | 10.0 |" in report.markdown


def test_the_report_draws_diagnostics_and_intervention_activity_over_training(tmp_path):
    """Per method, each measure's mean and range over its runs (all games) against agent steps:
    the diagnostics results.json records, and the interventions' cumulative activity."""
    runs = tmp_path / "runs"
    for seed, dormant in ((1, (0.1, 0.3)), (2, (0.2, 0.5))):
        write_results(runs / f"pong{seed}", "drq+redo", "Pong", seed, -10.0)
        path = runs / f"pong{seed}" / "results.json"
        payload = json.loads(path.read_text()) | {
            "diagnostics": [{"step": 5_000, "dormant_0.1/all": dormant[0], "effective_rank/all": 50.0, "other": 1.0},
                            {"step": 10_000, "dormant_0.1/all": dormant[1], "effective_rank/all": float("nan")}],
            "activity": [{"step": 5_000, "re_do/recycled": 3 * seed}, {"step": 10_000, "re_do/recycled": 7 * seed}],
        }  # fmt: skip
        path.write_text(json.dumps(payload))
    write_results(runs / "boxing", "drq", "Boxing", 1, 5.0)  # nothing recorded during training
    scores = scoring.collect_run_scores([runs])
    report = reporting.build_report(scores, tmp_path / "out", reps=100, profile_reps=10)
    rows = [(r["method"], r["measure"], int(r["step"]), float(r["mean"]), float(r["min"]), float(r["max"]),
             int(r["runs"])) for r in csv.DictReader(open(tmp_path / "out" / "dynamics.csv"))]  # fmt: skip
    assert rows == [
        ("drq+redo", "dormant_0.1/all", 5_000, pytest.approx(0.15), 0.1, 0.2, 2),
        ("drq+redo", "dormant_0.1/all", 10_000, pytest.approx(0.4), 0.3, 0.5, 2),
        ("drq+redo", "interventions/re_do/recycled", 5_000, 4.5, 3.0, 6.0, 2),
        ("drq+redo", "interventions/re_do/recycled", 10_000, 10.5, 7.0, 14.0, 2),
    ]  # the rank at one step only (the other not finite): no line; unlisted measures left out
    assert (tmp_path / "out" / "dynamics.png").stat().st_size > 0 and "dynamics.png" in report.markdown
