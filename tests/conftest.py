from pathlib import Path

import pytest

from rlplastic import sweep

ROOT = Path(__file__).resolve().parents[1]


def load_agent(name: str):
    """Import agents/<name>.py as a module (agents are scripts, not a package), as sweeps do."""
    return sweep.load_agent(name)


@pytest.fixture(scope="session")
def drq():
    return load_agent("drq")
