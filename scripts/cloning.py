"""The cloning experiment (Joudaki et al., section 2 and Fig. 2.1): does training leave the cloning manifold?

    python scripts/cloning.py --out runs/cloning          # ~1 minute on a 2-core CPU

A ReLU MLP trained on scikit-learn's digits is cloned into a network `factor` times wider whose
clones compute exactly what the base units compute; base and clone then train on, the clone with
SGD, noisy SGD (sigma0 0.01, decay 0.999) or dropout. Writes cloning.json (histories and config),
cloning.csv (one row per variant and measurement) and cloning.png (cloning R^2, loss, effective
rank over the steps after cloning), and prints the final values. cloning.json is saved after every
variant: the same command again, after a kill, trains only the variants it lacks; a folder holding
the results of other settings is refused, never overwritten.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib
import tyro

from rlplastic.cloning import CloningConfig, run_cloning
from rlplastic.files import atomic_write, finished_runs, make_folder, save_runs

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("cloning_r2", "cloning R$^2$ (1 = perfect clones)"), ("loss", "training loss"),
          ("effective_rank", "effective rank, last hidden layer"))  # fmt: skip


@dataclass
class Args:
    out: Path = Path("runs/cloning")
    """output folder"""
    config: CloningConfig = field(default_factory=CloningConfig)
    """base network, cloning and training settings"""


def main(args: Args) -> dict:
    settings = {"config": asdict(args.config)}
    path = args.out / "cloning.json"
    try:
        make_folder(args.out, "--out")  # before the work, which a folder that cannot be made would lose
        done = finished_runs(path, settings, "histories", "--out")
        if done:
            print(f"cloning: {', '.join(done)} found in {path} (same settings): kept, the rest trained")
        result = run_cloning(args.config, done, on_run=lambda partial: save_runs(path, settings, partial, False))
    except ValueError as e:
        raise SystemExit(f"cloning: {e}") from None
    save_runs(path, settings, result, complete=True)
    rows = [{"variant": name, **row} for name, history in result["histories"].items() for row in history]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["variant", "step", "loss", "effective_rank", "cloning_r2"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(args.out / "cloning.csv", lambda f: f.write(text.getvalue().encode()))

    figure, axes = plt.subplots(1, len(PANELS), figsize=(15, 4))
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        for name, history in result["histories"].items():
            if key in history[0]:
                ax.plot([r["step"] for r in history], [r[key] for r in history], label=name)
        ax.set_title(title)
        ax.set_xlabel("steps after cloning")
    axes[0].legend()
    figure.tight_layout()
    atomic_write(args.out / "cloning.png", lambda f: figure.savefig(f, format="png", dpi=110))
    plt.close(figure)
    for name, history in result["histories"].items():
        last = history[-1]
        r2 = f"cloning R^2 {last['cloning_r2']:.6f}  " if "cloning_r2" in last else " " * 24
        print(f"{name:>10}: {r2}loss {last['loss']:.4f}  effective rank {last['effective_rank']:.2f}")
    print(f"wrote {args.out}/cloning.json, cloning.csv, cloning.png")
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
