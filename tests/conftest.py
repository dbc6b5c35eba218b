from pathlib import Path

import pytest

from rlplastic import agent_files
from rlplastic.cli import replace_flags as with_flags  # noqa: F401 (for the tests)

ROOT = Path(__file__).resolve().parents[1]


class Planted:
    """Unpickling this runs code (it touches a file): what a doctored checkpoint or data file would
    carry. Tests check that loading refuses it and the file never appears."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def killed_on_call(n: int, function):
    """A stand-in for `function` that a kill (KeyboardInterrupt) stops on its n-th call, and the list
    of the arguments of every call it received (clear it to count the calls of a later invocation).
    The calls after the n-th run `function`, so the same stand-in serves the resumed invocation."""
    calls: list[tuple] = []

    def stand_in(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise KeyboardInterrupt
        return function(*args, **kwargs)

    return stand_in, calls


def load_agent(name: str):
    """Import agents/<name>.py as a module (agents are scripts, not a package), as sweeps do."""
    return agent_files.load_agent(name)


@pytest.fixture(scope="session")
def drq():
    return load_agent("drq")


@pytest.fixture(scope="session")
def drq_batched():
    return agent_files.load_script("drq_batched")  # the machinery beside an agent, not an agent


@pytest.fixture(scope="session")
def bbf_agent():
    return load_agent("bbf")
