"""The stability gap with and without neuronal decay (Zhankov): rotated digits, replay, continual evaluation.

    python scripts/stability_gap.py --out runs/stability_gap                 # scikit-learn digits, ~1 minute
    python scripts/stability_gap.py --config.data-dir ~/data/mnist --out runs/sg_mnist   # real MNIST IDX files

Runs every method for every seed and writes stability_gap.json (metrics and accuracy curves of each
run), stability_gap.md (gap depth GD, time to recover TTR and average accuracy ACC per interval,
mean ± std over seeds) and stability_gap.png (task 1's accuracy after every batch, first seed).
stability_gap.json is saved after every run: the same command again, after a kill, runs only what it
lacks; a folder holding the results of other settings is refused, never overwritten.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import matplotlib
import numpy as np
import tyro

from rlplastic.files import atomic_write, finished_runs, make_folder, save_runs
from rlplastic.supervised.stability_gap import METHODS, StabilityGapConfig, run_stability_gap

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class Args:
    out: Path = Path("runs/stability_gap")
    """output folder"""
    methods: tuple[str, ...] = METHODS
    """methods to compare (baseline: replay alone)"""
    seeds: int = 3
    """seeds per method"""
    config: StabilityGapConfig = field(default_factory=StabilityGapConfig)
    """protocol settings shared by every run (its method and seed are set per run)"""


def table(runs: dict[str, list[dict]]) -> str:
    keys = list(next(iter(runs.values()))[0]["metrics"])
    keys = sorted(keys, key=lambda k: (k.split("_")[-1].split(",")[-1], k))
    lines = ["| metric | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for key in keys:
        cells = []
        for results in runs.values():
            values = [r["metrics"][key] for r in results]
            std = np.std(values, ddof=1) if len(values) > 1 else 0.0
            cells.append(f"{np.mean(values):.1f} ± {std:.1f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: Args) -> dict:
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or args.seeds < 1:
        raise SystemExit(f"stability_gap: --methods {unknown} / --seeds {args.seeds}: allowed methods "
                         f"{', '.join(METHODS)}, seeds >= 1")  # fmt: skip
    settings = {"config": asdict(args.config), "seeds": args.seeds}
    path = args.out / "stability_gap.json"
    try:
        make_folder(args.out, "--out")  # before the work, which a folder that cannot be made would lose
        done = finished_runs(path, settings, "runs", "--out")
        if set(done) - set(args.methods):  # writing the file again would drop them
            raise ValueError(f"--out {args.out}: {path.name} holds runs of --methods {' '.join(sorted(done))}, not "
                             "all given now; it is kept: add them, move it away or choose another --out")  # fmt: skip
        if done:
            found = sum(len(results) for results in done.values())
            print(f"stability_gap: {found} runs found in {path} (same settings): kept, the rest run")
        runs: dict[str, list[dict]] = {}
        for m in args.methods:
            runs[m] = list(done.get(m, []))[: args.seeds]  # seeds 0, 1, ... in order
            for s in range(len(runs[m]), args.seeds):
                runs[m].append(run_stability_gap(replace(args.config, method=m, seed=s)))
                save_runs(path, settings, {"runs": runs}, complete=False)
    except ValueError as e:
        raise SystemExit(f"stability_gap: {e}") from None
    save_runs(path, settings, {"runs": runs}, complete=True)
    data = runs[args.methods[0]][0]["data"]
    legend = (
        "GD_t,j: gap depth of task t in interval j (p.p.); TTR_t,j: time to recover (% of the interval's "
        "batches); ACC_AVG,j: mean accuracy over the tasks seen, at the end of interval j (%)."
    )
    setting = f"rotations {args.config.angles}, {args.config.epochs} epochs per task, replay {args.config.replay}"
    text = f"Data: {data}, {setting}; mean ± std over {args.seeds} seeds. {legend}\n\n{table(runs)}\n"
    atomic_write(args.out / "stability_gap.md", lambda f: f.write(text.encode()))
    figure, ax = plt.subplots(figsize=(9, 4))
    for method, results in runs.items():
        ax.plot(results[0]["curves"][0], label=f"{method}: task 1")
    for b in runs[args.methods[0]][0]["boundaries"][1:]:
        ax.axvline(b, color="grey", linestyle=":")
    ax.set_xlabel("batches")
    ax.set_ylabel("task 1 test accuracy (%)")
    ax.legend()
    figure.tight_layout()
    atomic_write(args.out / "stability_gap.png", lambda f: figure.savefig(f, format="png", dpi=110))
    plt.close(figure)
    print(text)
    return runs


if __name__ == "__main__":
    main(tyro.cli(Args))
