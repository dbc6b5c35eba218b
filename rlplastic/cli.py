"""Command lines with named configurations (presets), on tyro.

    args = cli_with_presets(Args, PRESETS, __doc__)    # python agents/bbf.py bbf-rr8 --env-id Pong

The first argument may name a preset: the run starts from its values and any flag after it
overrides them. Without one, the dataclass defaults apply. --help lists the presets."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import TypeVar

import tyro

T = TypeVar("T")

# Seeds are non-negative (numpy refuses others) and leave room for the seeds derived from them
# (evaluation environments at seed + 20,000 + step) below numpy's legacy limit of 2**32.
MAX_SEED = 2**31 - 1


def seed_problems(flag: str, seed: int) -> list[str]:
    """The problems with a seed (none or one): seeds are integers in [0, MAX_SEED]."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        return [f"{flag} {seed}: a seed must be an integer in [0, {MAX_SEED}]"]
    return []


def cli_with_presets(
    args_type: type[T], presets: dict[str, tuple[str, T]], description: str | None, argv: Sequence[str] | None = None
) -> T:
    """Parse `argv` (default sys.argv[1:]) into `args_type`; `presets` maps a name to a one-line
    description and an instance of `args_type`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = Path(sys.argv[0]).name
    listing = "\n".join(f"  {name:<16} {text}" for name, (text, _) in presets.items())
    usage = f"Presets: {prog} PRESET [flags], flags override the preset:"
    description = f"{(description or '').strip()}\n\n{usage}\n{listing}"
    if argv and not argv[0].startswith("-"):
        name = argv.pop(0)
        if name not in presets:
            sys.exit(f"{prog}: unknown preset {name!r}; presets: {', '.join(presets)} (or flags only)")
        text, default = presets[name]
        return tyro.cli(args_type, default=default, args=argv, prog=f"{prog} {name}", description=f"{name}: {text}")
    return tyro.cli(args_type, args=argv, prog=prog, description=description)


def replace_flags(args: T, **flags: object) -> T:
    """`args` (an agent's Args) with fields replaced by their flag names, as the command line gives
    them: each goes to the field of Args, or of a nested options dataclass, that bears the name.

        replace_flags(drq.Args(), env_id="Pong", reset=("redo",), device="cpu")"""
    nested = {f.name: getattr(args, f.name) for f in fields(args) if is_dataclass(getattr(args, f.name))}
    top: dict[str, object] = {}
    parts: dict[str, dict[str, object]] = {name: {} for name in nested}
    for key, value in flags.items():
        owner = next((name for name, options in nested.items() if key in {f.name for f in fields(options)}), None)
        if owner is not None:
            parts[owner][key] = value
        elif key in {f.name for f in fields(args)}:
            top[key] = value
        else:
            raise TypeError(f"{type(args).__name__} has no flag {key!r}")
    return replace(args, **top, **{name: replace(nested[name], **parts[name]) for name in nested if parts[name]})


RUN_FLAGS = ("--env-id", "--seed")  # the flags that may take several values: one run per combination


def expand_runs(argv: Sequence[str]) -> list[list[str]]:
    """Split a command line that gives several values to RUN_FLAGS (--env-id Pong Boxing --seed 1 2 3)
    into one command line per combination, games first, in the order given. With more than one run,
    an --output-dir DIR without {method}, {game} or {seed} in it becomes DIR/{method}/{game}/seed{seed},
    the one layout of run folders (rlplastic.runs.run_folder); each run fills it in."""
    base: list[str] = []
    values: dict[str, list[str]] = {}
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        if tokens[i] in RUN_FLAGS:
            flag, j = tokens[i], i + 1
            while j < len(tokens) and not tokens[j].startswith("--"):
                j += 1
            if j == i + 1:
                base.append(flag)  # no value: left for the parser to refuse
            else:
                values[flag] = tokens[i + 1 : j]
            i = j
        else:
            base.append(tokens[i])
            i += 1
    combos: list[list[tuple[str, str]]] = [[]]
    for flag in RUN_FLAGS:
        if flag in values:
            combos = [combo + [(flag, value)] for combo in combos for value in values[flag]]
    where = base.index("--output-dir") + 1 if "--output-dir" in base[:-1] else None
    runs = []
    for combo in combos:
        command = list(base)
        templated = where is not None and any(key in base[where] for key in ("{method}", "{game}", "{seed}"))
        if where is not None and len(combos) > 1 and not templated:
            command[where] = str(Path(base[where]) / "{method}" / "{game}" / "seed{seed}")
        runs.append(command + [token for pair in combo for token in pair])
    return runs
