"""Reading pickles that come from elsewhere without running their code.

Python's pickle builds whatever classes a file names, and a doctored file can name one that runs
code. Formats the project reads that are pickles by nature (CIFAR's batches, an emulator state
inside a checkpoint) go through an unpickler that builds only the classes a predicate allows.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import IO, Any


def restricted_load(file: IO[bytes], allowed: Callable[[str, str], bool], what: str, **kwargs: Any) -> Any:
    """pickle.load(file, **kwargs), refusing (UnpicklingError) any class for which
    allowed(module, name) is False; `what` names the file's kind in the message."""

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if allowed(module, name):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from {what}")

    return Restricted(file, **kwargs).load()
