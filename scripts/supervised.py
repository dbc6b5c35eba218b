"""Supervised plasticity runs and their tables (thin CLI over rlplastic.supervised).

  python scripts/supervised.py run --dataset mnist1d --model mlp --protocol warm-start --subset 0.1 \\
      --noise 0.5 --method shrink-perturb --epochs 100 --seed 0 --out results.jsonl
  python scripts/supervised.py table results.jsonl                 # warm-start table (auto)
  python scripts/supervised.py table results.jsonl --kind lifecycle
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from rlplastic.supervised.data import DATASETS, DataError
from rlplastic.supervised.models import MODELS
from rlplastic.supervised.train import METHODS, PROTOCOLS, RunConfig, read_jsonl, run, validate

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


def table(args: argparse.Namespace) -> int:
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
    kind = args.kind
    if kind == "auto":
        kind = "warm-start" if any(r["protocol"] == "warm-start" for r in rows) else "lifecycle"
    print(warm_start_table(rows) if kind == "warm-start" else lifecycle_table(rows))
    return 0


def run_command(args: argparse.Namespace) -> int:
    names = {f.name for f in fields(RunConfig)}
    config = RunConfig(**{k: v for k, v in vars(args).items() if k in names})
    problems = validate(config)
    if problems:
        print("supervised run: invalid arguments:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if Path(args.out).is_dir():
        print(f"supervised run: error: --out {args.out}: is a folder; give the JSON-lines file to append to",
              file=sys.stderr)  # fmt: skip
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train one dataset / model / protocol / method / seed")
    d = RunConfig()
    r.add_argument("--dataset", default=d.dataset, help=f"one of {', '.join(DATASETS)}")
    r.add_argument("--data-dir", default=None, help="folder with the data set's files (not for mnist1d, digits)")
    r.add_argument("--model", default=d.model, help=f"one of {', '.join(MODELS)}")
    r.add_argument("--protocol", default=d.protocol, help=f"one of {', '.join(PROTOCOLS)}")
    r.add_argument("--method", default=d.method, help=f"one of {', '.join(METHODS)}")
    r.add_argument("--subset", type=float, default=d.subset, help="warm-start: share of the data in phase 1")
    r.add_argument("--noise", type=float, default=d.noise, help="label noise of phase 1 / the first chunk")
    r.add_argument(
        "--epochs",
        type=int,
        default=d.epochs,
        help="fresh: all; warm-start: phase 2 (phase 1: epochs / subset); continual: per chunk",
    )
    r.add_argument("--seed", type=int, default=d.seed)
    r.add_argument("--batch-size", type=int, default=d.batch_size)
    r.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the model's)")
    r.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: the model's)")
    r.add_argument("--warmup", type=float, default=d.warmup, help="share of each phase's steps warming up from lr 0")
    r.add_argument("--schedule", default=d.schedule, help="after the warm-up: constant or cosine (to 0)")
    r.add_argument("--augment", action="store_true", help="crop + flip with any method (lifecycle tables)")
    r.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient norm clip (0 = none)")
    r.add_argument("--chunks", type=int, default=d.chunks, help="continual: number of chunks")
    r.add_argument("--buffer", type=int, default=d.buffer, help="continual: sample buffer size (0 = full access)")
    r.add_argument(
        "--strength", type=float, default=None, help="weight of l2 / spectral-decoupling / regen / neuronal-decay"
    )
    r.add_argument("--ht-momentum", type=float, default=d.ht_momentum, help="Hare & Tortoise / EMA momentum")
    r.add_argument("--ht-reset-epochs", type=int, default=d.ht_reset_epochs,
                   help="Hare & Tortoise: epochs (of the data trained on) between hare <- tortoise resets")  # fmt: skip
    r.add_argument("--ht-horizon", type=float, default=d.ht_horizon,
                   help="Hare & Tortoise / EMA: EMA horizon 1/(1-momentum) as a share of each phase's steps "
                   "(0 = use --ht-momentum)")  # fmt: skip
    r.add_argument("--ht-reset-share", type=float, default=d.ht_reset_share,
                   help="Hare & Tortoise: reset period as a share of each phase's steps "
                   "(0 = --ht-reset-epochs)")  # fmt: skip
    r.add_argument("--redo-tau", type=float, default=d.redo_tau, help="ReDo: dormancy threshold tau")
    r.add_argument("--redo-every-epochs", type=int, default=d.redo_every_epochs,
                   help="ReDo: epochs (of the data trained on) between recycling passes (paper: 5)")  # fmt: skip
    r.add_argument("--topk-min", type=float, default=d.topk_min)
    r.add_argument("--topk-decay", type=float, default=d.topk_decay)
    r.add_argument("--topk-cycle", type=int, default=d.topk_cycle, help="topk-cycle: epochs between resets to dense")
    r.add_argument("--topk-tolerance", type=float, default=d.topk_tolerance,
                   help="topk-accuracy: allowed training-accuracy drop; topk-plateau: relative loss improvement "
                   "below which the loss counts as flat")  # fmt: skip
    r.add_argument("--lc-layers", default=d.lc_layers, help="lifecycle: fc (the paper), conv or all hidden layers")
    r.add_argument("--lc-lifespan", type=int, nargs=2, default=d.lc_lifespan, metavar=("LOW", "HIGH"),
                   help="lifecycle: range of the units' lifespans in steps")  # fmt: skip
    r.add_argument("--lc-recovery", type=int, nargs=2, default=d.lc_recovery, metavar=("LOW", "HIGH"),
                   help="lifecycle: range of the recovery times in steps")  # fmt: skip
    r.add_argument("--lc-warmup", type=int, default=d.lc_warmup, help="lifecycle: warm-up steps of a revived unit")
    r.add_argument("--lc-revival", default=d.lc_revival, help="lifecycle: memory, he or xavier")
    r.add_argument("--no-hessian", dest="hessian", action="store_false", help="skip the Hessian eigenvalue")
    r.add_argument("--log-every", type=int, default=0, help="epochs between progress lines (0 = ~10 per phase)")
    r.add_argument("--tb-dir", default=None, help="tensorboard folder for this run's scalars")
    r.add_argument("--checkpoint-dir", default=None,
                   help="checkpoint every epoch in this folder; the same command again resumes the run")  # fmt: skip
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r.add_argument("--out", default="results.jsonl", help="JSON-lines file the result line is appended to")
    r.set_defaults(func=run_command)
    t = sub.add_parser("table", help="Markdown tables of result lines")
    t.add_argument("results", nargs="+", help="JSON-lines files written by run")
    t.add_argument("--kind", choices=("auto", "warm-start", "lifecycle"), default="auto")
    t.set_defaults(func=table)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
