"""Agents are single-file scripts in agents/ (agents/drq.py, agents/bbf.py). This module loads one
as a module and checks, in one place, what sweeps, reports and tests rely on it to offer (Agent).

    drq = load_agent("drq")                      # refused with the missing names if it lacks any
    args = drq.Args(env_id="Pong"); drq.validate(args); drq.main(args)
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

AGENTS_DIR = Path(__file__).resolve().parents[1] / "agents"


class AgentError(ValueError):
    """An agent name that names no agent file, or a file that does not keep the Agent contract."""


class Agent(Protocol):
    """The contract of an agent file. Args is a dataclass with env_id, seed and run (RunOptions)
    fields, whose other fields are the agent's flags."""

    Args: type
    PRESETS: dict[str, tuple[str, Any]]  # name -> (one line, an Args): a paper's settings, by name
    LABELLED_ARGS: set[str]  # the fields method_label shows; a sweep names runs by any other it varies

    def validate(self, args: Any) -> list[str]:
        """Every problem with the arguments, each naming the value and what is allowed."""

    def method_label(self, args: Any) -> str:
        """The name reports group runs by (--exp-name, or the agent plus its variants)."""

    def main(self, args: Any) -> dict:
        """One run to its results.json; returns the results."""


CONTRACT = {
    "Args": "the dataclass of its flags",
    "PRESETS": "named settings: {name: (description, Args)}",
    "LABELLED_ARGS": "the Args fields its method label shows",
    "validate": "validate(args) -> list of problems",
    "method_label": "method_label(args) -> the name reports group runs by",
    "main": "main(args) -> the results of one run",
}
ARGS_FIELDS = ("env_id", "seed", "run")


def agent_path(name: str) -> Path:
    path = AGENTS_DIR / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in AGENTS_DIR.glob("*.py"))
        raise AgentError(f"unknown agent {name!r}; allowed: {', '.join(known)} (files in {AGENTS_DIR})")
    return path


def load_script(name: str) -> ModuleType:
    """Import agents/<name>.py as a module (agents are scripts, not a package); once per process."""
    module_name = f"rlplastic_agent_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, agent_path(name))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def contract_problems(module: ModuleType) -> list[str]:
    """What `module` lacks of the Agent contract, each with what it is for; [] when it keeps it."""
    problems = [f"{name} ({what})" for name, what in CONTRACT.items() if not hasattr(module, name)]
    args = getattr(module, "Args", None)
    if args is not None:
        names = {f.name for f in fields(args)} if is_dataclass(args) else set()
        problems += [f"Args.{name}" for name in ARGS_FIELDS if name not in names]
    return problems


def load_agent(name: str) -> Agent:
    """agents/<name>.py, checked against the Agent contract (AgentError naming what it lacks)."""
    module = load_script(name)
    problems = contract_problems(module)
    if problems:
        raise AgentError(f"agents/{name}.py is not an agent sweeps can run: it lacks {', '.join(problems)}")
    return module  # type: ignore[return-value]
