"""Supervised plasticity runs and their tables (thin CLI over rlplastic.supervised).

  python scripts/supervised.py run --dataset mnist1d --model mlp --protocol warm-start --subset 0.1 \\
      --noise 0.5 --method shrink-perturb --epochs 100 --seed 0 --out results.jsonl
  python scripts/supervised.py table results.jsonl                 # warm-start table (auto)
  python scripts/supervised.py table results.jsonl --kind lifecycle
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import tyro

from rlplastic.files import file_destination_problem
from rlplastic.supervised.data import DataError
from rlplastic.supervised.train import RunConfig, read_jsonl, run, run_key, validate

LIFECYCLE_COLUMNS = (("ACC", "test_acc", 100), ("mCA", "mca", 100), ("ECE", "ece", 100), ("Hessian", "hessian", 1),
                     ("Lipschitz", "lipschitz", 1))  # fmt: skip


GROUP_KEYS = ("dataset", "model", "protocol", "subset", "noise")
REQUIRED_KEYS = {*GROUP_KEYS, "method", "test_acc", "train_acc"}
# config fields that do not change what a run measures
NOT_SETTINGS = {"seed", "data_dir", "device", "log_every", "tb_dir", "hessian", "method", "checkpoint_dir", *GROUP_KEYS}


def mean_std(values: list[float], scale: float = 1.0) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "—"
    std = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):.2f} ± {std:.2f} ({len(values)})"


def group_name(row: dict) -> str:
    name = f"{row['dataset']} / {row['model']} — {row['protocol']}"
    if row["protocol"] == "warm-start":
        name += f", subset {row['subset']}, label noise {row['noise']}"
    elif row["protocol"] == "continual":
        name += f", label noise from {row['noise']}"
    return name


def row_label(row: dict) -> str:
    """The method, with every setting in which the run differs from the runner's defaults (so two
    settings of one method are two rows, never averaged together)."""
    defaults = asdict(RunConfig())
    config = row.get("config", {})
    changed = [f"{k}={_short(v)}" for k, v in config.items() if k not in NOT_SETTINGS and k in defaults
               and _short(v) != _short(defaults[k])]  # fmt: skip
    return row["method"] + (f" ({', '.join(changed)})" if changed else "")


def _short(value):
    return list(value) if isinstance(value, tuple | list) else value


def grouped(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """{group: {row label: runs}}, in first-seen order; a group is one (dataset, model, protocol,
    subset, noise)."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for row in rows:
        groups.setdefault(group_name(row), {}).setdefault(row_label(row), []).append(row)
    return groups


def warm_start_table(rows: list[dict]) -> str:
    """One table per (dataset, model, protocol, subset, noise); rows: method and its settings;
    cells: final test and train accuracy in %, mean ± std over seeds (n)."""
    out = []
    for group, runs_by_label in grouped(rows).items():
        lines = [f"### {group}", "", "| method | test accuracy (%) | train accuracy (%) |", "|---|---|---|"]
        for label, runs in runs_by_label.items():
            test, train = mean_std([r["test_acc"] for r in runs], 100), mean_std([r["train_acc"] for r in runs], 100)
            lines.append(f"| {label} | {test} | {train} |")
        out.append("\n".join(lines))
    return "Final accuracy, mean ± std over seeds (n)\n\n" + "\n\n".join(out)


def lifecycle_table(rows: list[dict]) -> str:
    """One table per (dataset, model, protocol, subset, noise): rows method, columns ACC, mCA, ECE
    (in %), Hessian top eigenvalue, Lipschitz bound; mean ± std over seeds (n)."""
    out = []
    for group, runs_by_label in grouped(rows).items():
        lines = [f"### {group}", "", "| method | " + " | ".join(c for c, _, _ in LIFECYCLE_COLUMNS) + " |",
                 "|---|" + "---|" * len(LIFECYCLE_COLUMNS)]  # fmt: skip
        for label, runs in runs_by_label.items():
            cells = [mean_std([r.get(key) for r in runs], scale) for _, key, scale in LIFECYCLE_COLUMNS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def drop_repeats(rows: list[dict]) -> tuple[list[dict], int]:
    """The rows with every run once (the first line of each settings-and-seed), and how many were
    dropped: a run appended twice (files joined, or written before run skipped finished runs) must
    not count as two seeds, which would shrink the standard deviation."""
    seen, kept = set(), []
    for row in rows:
        key = run_key(row["config"]) if isinstance(row.get("config"), dict) else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        kept.append(row)
    return kept, len(rows) - len(kept)


def table(args: Table) -> int:
    rows = []
    for path in args.results:
        if not Path(path).is_file():
            print(f"supervised table: error: {path}: no such file", file=sys.stderr)
            return 2
        try:
            lines = read_jsonl(path)
        except (ValueError, UnicodeDecodeError) as e:
            print(f"supervised table: error: {e}; fix or remove that line", file=sys.stderr)
            return 2
        bad = [i for i, row in enumerate(lines, 1) if not isinstance(row, dict) or not REQUIRED_KEYS <= set(row)]
        rows += lines
        if bad:
            print(f"supervised table: error: {path}: result {bad[0]} lacks {', '.join(sorted(REQUIRED_KEYS))}: "
                  "not a line written by supervised.py run", file=sys.stderr)  # fmt: skip
            return 2
    if not rows:
        print("supervised table: error: no result lines", file=sys.stderr)
        return 2
    rows, repeats = drop_repeats(rows)
    if repeats:
        print(f"supervised table: {repeats} line(s) repeat a run already read (the same settings and seed): "
              "counted once, not as more seeds", file=sys.stderr)  # fmt: skip
    kind = args.kind
    if kind == "auto":
        kind = "warm-start" if any(r["protocol"] == "warm-start" for r in rows) else "lifecycle"
    print(warm_start_table(rows) if kind == "warm-start" else lifecycle_table(rows))
    return 0


@dataclass
class Run:
    """Train one dataset / model / protocol / method / seed and append its result line to --out."""

    config: Annotated[RunConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=RunConfig)
    out: str = "results.jsonl"
    """JSON-lines file the result line is appended to"""


@dataclass
class Table:
    """Markdown tables of result lines, one per (dataset, model, protocol, subset, noise)."""

    results: tyro.conf.Positional[list[str]]
    """JSON-lines files written by run"""
    kind: Literal["auto", "warm-start", "lifecycle"] = "auto"
    """warm-start: test and train accuracy; lifecycle: ACC, mCA, ECE, Hessian, Lipschitz"""


def run_command(args: Run) -> int:
    config = args.config
    problems = validate(config)
    if problems:
        print("supervised run: invalid arguments:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    problem = file_destination_problem(args.out, "--out")  # a folder, unwritable, a name too long: before work
    if problem:
        print(f"supervised run: error: {problem}", file=sys.stderr)
        return 2
    try:
        run(config, out=args.out)
    except (DataError, ValueError) as e:
        print(f"supervised run: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # a diverged run or an unreadable checkpoint: one line, non-zero
        print(e.code, file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = tyro.extras.subcommand_cli_from_dict({"run": Run, "table": Table}, args=argv, description=__doc__)
    return run_command(args) if isinstance(args, Run) else table(args)


if __name__ == "__main__":
    sys.exit(main())
