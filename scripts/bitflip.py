"""Plasticity loss on the bit-flipping benchmark: plain SGD vs switching to continual backprop half-way.

    python scripts/bitflip.py --out runs/bitflip            # ~1.5 minutes on a 2-core CPU

Writes bitflip.json (both histories and the config), bitflip.md (the table below) and bitflip.png
(online error, effective rank, dead and duplicate fractions of the hidden layer over time).
bitflip.json is saved after each of the two runs: the same command again, after a kill, runs only
what it lacks; a folder holding the results of other settings is refused, never overwritten.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib
import tyro

from rlplastic.bitflip import BitFlipConfig, run_bitflip
from rlplastic.files import atomic_write, finished_runs, make_folder, save_runs

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (
    ("error", "online squared error"),
    ("effective_rank", "effective rank"),
    ("dead", "dead units"),
    ("duplicate", "duplicate units"),
)


@dataclass
class Args:
    out: Path = Path("runs/bitflip")
    """output folder"""
    config: BitFlipConfig = field(default_factory=BitFlipConfig)
    """benchmark and learner settings"""


def main(args: Args) -> dict:
    config = args.config
    switch = config.steps // 2
    settings = {"config": asdict(config), "switch_step": switch}
    path = args.out / "bitflip.json"
    try:
        make_folder(args.out, "--out")  # before the work, which a folder that cannot be made would lose
        done = finished_runs(path, settings, "runs", "--out")
    except ValueError as e:
        raise SystemExit(f"bitflip: {e}") from None
    runs = {}
    for label, cbp_from in (("SGD", None), (f"SGD, CBP from step {switch}", switch)):
        if label in done:
            print(f"bitflip: {label}: found in {path} (same settings), kept", flush=True)
            runs[label] = done[label]
            continue
        print(f"bitflip: {label}", flush=True)
        runs[label] = run_bitflip(config, cbp_from, report=lambda row: print("  " + _line(row), flush=True))
        save_runs(path, settings, {"runs": runs}, complete=False)
    save_runs(path, settings, {"runs": runs}, complete=True)
    table = _table(runs, switch)
    atomic_write(args.out / "bitflip.md", lambda f: f.write(table.encode()))
    _plot(runs, switch, args.out / "bitflip.png")
    print(table)
    print(f"bitflip: wrote {args.out}/bitflip.json, bitflip.md, bitflip.png")
    return runs


def _line(row: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def _table(runs: dict, switch: int) -> str:
    """Values just before the switch and at the end, for both runs."""
    lines = ["| run | step | " + " | ".join(title for _, title in PANELS) + " |", "|---" * (2 + len(PANELS)) + "|"]
    for label, history in runs.items():
        for step in (switch, history["step"][-1]):
            i = history["step"].index(step)
            values = " | ".join(f"{history[key][i]:.3f}" for key, _ in PANELS)
            lines.append(f"| {label} | {step} | {values} |")
    lines.append("")
    for label, history in runs.items():
        second_half = [e for s, e in zip(history["step"], history["error"], strict=True) if s > switch]
        lines.append(
            f"- {label}: mean online squared error after step {switch}: {sum(second_half) / len(second_half):.3f}"
        )
    return "\n".join(lines) + "\n"


def _plot(runs: dict, switch: int, path: Path) -> None:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.4))
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        for label, history in runs.items():
            ax.plot(history["step"], history[key], label=label)
        ax.axvline(switch, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.suptitle("Bit-flipping benchmark: plasticity lost under SGD, restored by continual backprop")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


if __name__ == "__main__":
    main(tyro.cli(Args))
