"""Supervised plasticity runs and their tables (thin CLI over rlplastic.supervised).

  python scripts/supervised.py run --dataset mnist1d --model mlp --protocol warm-start --subset 0.1 \\
      --noise 0.5 --method shrink-perturb --epochs 100 --seed 0 --out results.jsonl
  python scripts/supervised.py table results.jsonl                 # warm-start table (auto)
  python scripts/supervised.py table results.jsonl --kind lifecycle
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import fields
from pathlib import Path

import numpy as np

from rlplastic.supervised.data import DATASETS, DataError
from rlplastic.supervised.models import MODELS
from rlplastic.supervised.train import METHODS, PROTOCOLS, RunConfig, read_jsonl, run, validate

LIFECYCLE_COLUMNS = (("ACC", "test_acc", 100), ("mCA", "mca", 100), ("ECE", "ece", 100), ("Hessian", "hessian", 1),
                     ("Lipschitz", "lipschitz", 1))  # fmt: skip


def mean_std(values: list[float], scale: float = 1.0) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "—"
    std = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):.2f} ± {std:.2f} ({len(values)})"


def row_label(row: dict) -> str:
    return row["method"] if row["protocol"] == "warm-start" else f"{row['method']} ({row['protocol']})"


def warm_start_table(rows: list[dict]) -> str:
    """Rows: method (protocol when not warm-start); columns: dataset / model; cells: final test
    accuracy in %, mean ± std over seeds (n)."""
    columns = sorted({f"{r['dataset']} / {r['model']}" for r in rows})
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    labels: list[str] = []
    for r in rows:
        label = row_label(r)
        if label not in labels:
            labels.append(label)
        cells[(label, f"{r['dataset']} / {r['model']}")].append(r["test_acc"])
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(mean_std(cells[(label, c)], 100) for c in columns) + " |")
    return "Final test accuracy (%), mean ± std over seeds (n)\n\n" + "\n".join(lines)


def lifecycle_table(rows: list[dict]) -> str:
    """One table per dataset / model: rows method, columns ACC, mCA, ECE (in %), Hessian top
    eigenvalue, Lipschitz bound; mean ± std over seeds (n)."""
    out = []
    for group in sorted({(r["dataset"], r["model"]) for r in rows}):
        subset = [r for r in rows if (r["dataset"], r["model"]) == group]
        labels = list(dict.fromkeys(row_label(r) for r in subset))
        lines = [f"### {group[0]} / {group[1]}", "", "| method | " + " | ".join(c for c, _, _ in LIFECYCLE_COLUMNS)
                 + " |", "|---|" + "---|" * len(LIFECYCLE_COLUMNS)]  # fmt: skip
        for label in labels:
            mine = [r for r in subset if row_label(r) == label]
            cells = [mean_std([r.get(key) for r in mine], scale) for _, key, scale in LIFECYCLE_COLUMNS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def table(args: argparse.Namespace) -> int:
    rows = []
    for path in args.results:
        if not Path(path).is_file():
            print(f"supervised table: error: {path}: no such file", file=sys.stderr)
            return 2
        rows += read_jsonl(path)
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
    try:
        run(config, out=args.out)
    except DataError as e:
        print(f"supervised run: error: {e}", file=sys.stderr)
        return 2
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
    r.add_argument("--topk-cycle", type=int, default=d.topk_cycle)
    r.add_argument("--no-hessian", dest="hessian", action="store_false", help="skip the Hessian eigenvalue")
    r.add_argument("--log-every", type=int, default=0, help="epochs between progress lines (0 = ~10 per phase)")
    r.add_argument("--tb-dir", default=None, help="tensorboard folder for this run's scalars")
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
