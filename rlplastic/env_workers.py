"""The training environments of several runs in worker processes, stepped together.

    workers = EnvWorkers([("Pong", 1), ("Pong", 2), ("Boxing", 1)], processes=2, max_episode_steps=27_000)
    env = workers.env(0)                      # a stand-in for run 0's environment (reset, state_dict, ...)
    results = workers.step_all([a0, a1, a2])  # every env steps once, the workers in parallel

Each environment is the Atari-100k protocol's own (rlplastic.envs.atari), built and seeded in its
worker exactly as a run builds it alone, so a run's episodes are the same wherever its environment
lives. step_all starts the next episode right away when one ends, as a run's loop does, and returns
the first observation of that next episode. Stepping many emulators is CPU work that one Python
process does one after another; workers spread it over the cores while the GPU trains.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np

from rlplastic.envs.atari import step_env

StepResult = tuple[np.ndarray, float, bool, bool, dict]


def _serve(connection, specs: list[tuple[str, int, int, str]]) -> None:
    """A worker: builds its environments, then answers commands until told to close."""
    import signal

    from rlplastic.envs.atari import make_atari100k_env

    # Ctrl-C reaches the whole process group: the training process reports it and ends the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    envs = []
    try:
        envs = [
            make_atari100k_env(game, seed, max_episode_steps=cap, noop_unit=unit) for game, seed, cap, unit in specs
        ]
        connection.send(("ok", [int(env.action_space.n) for env in envs]))
    except Exception:  # noqa: BLE001 (reported to the parent, which raises)
        connection.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            command, argument = connection.recv()
        except (EOFError, OSError):  # the training process is gone (ended or killed): so is the worker
            return
        try:
            if command == "step":
                answer = [step_env(env, action) for env, action in zip(envs, argument, strict=True)]
            elif command == "reset":
                answer = envs[argument[0]].reset()[0]
            elif command == "state":
                answer = envs[argument[0]].state_dict()
            elif command == "load":
                index, state = argument
                answer = envs[index].load_state_dict(state)
            elif command == "close":
                for env in envs:
                    env.close()
                connection.send(("ok", None))
                return
            else:
                raise ValueError(f"unknown command {command!r}")
            connection.send(("ok", answer))
        except Exception:  # noqa: BLE001
            connection.send(("error", traceback.format_exc()))


class WorkerEnv:
    """Stands in for one run's environment in a worker: what a run calls besides step."""

    def __init__(self, workers: EnvWorkers, index: int, num_actions: int):
        from gymnasium.spaces import Discrete

        self.workers, self.index = workers, index
        self.action_space = Discrete(num_actions)

    def reset(self) -> tuple[np.ndarray, dict]:
        return self.workers.ask(self.index, "reset"), {}

    def state_dict(self) -> dict:
        return self.workers.ask(self.index, "state")

    def load_state_dict(self, state: dict) -> None:
        self.workers.ask(self.index, "load", state)

    def close(self) -> None:
        self.workers.close()


class EnvWorkers:
    """`processes` worker processes holding the environments of (game, seed) runs, dealt round
    robin; step_all steps them all at once."""

    def __init__(
        self, runs: Sequence[tuple[str, int]], processes: int, max_episode_steps: int, noop_unit: str = "agent-steps"
    ):
        processes = max(1, min(processes, len(runs)))
        context = mp.get_context("spawn")  # never fork a process whose torch has started its threads
        self._owner = [i % processes for i in range(len(runs))]
        self._local = [i // processes for i in range(len(runs))]
        self._connections, self._processes = [], []
        for worker in range(processes):
            specs = [(game, seed, max_episode_steps, noop_unit)
                     for i, (game, seed) in enumerate(runs) if self._owner[i] == worker]  # fmt: skip
            parent, child = context.Pipe()
            process = context.Process(target=_serve, args=(child, specs), daemon=True)
            process.start()
            self._connections.append(parent)
            self._processes.append(process)
        num_actions = [self._receive(worker) for worker in range(processes)]
        self._envs = [WorkerEnv(self, i, num_actions[self._owner[i]][self._local[i]]) for i in range(len(runs))]
        self.closed = False

    def env(self, index: int) -> WorkerEnv:
        return self._envs[index]

    def _receive(self, worker: int) -> Any:
        status, answer = self._connections[worker].recv()
        if status != "ok":
            raise RuntimeError(f"environment worker {worker} failed:\n{answer}")
        return answer

    def ask(self, index: int, command: str, *payload: Any) -> Any:
        """Run `command` on environment `index` in its worker (its place there, then `payload`)."""
        worker = self._owner[index]
        self._connections[worker].send((command, (self._local[index], *payload)))
        return self._receive(worker)

    def step_all(self, actions: Sequence[int | None]) -> list[StepResult | None]:
        """Step every environment with its action, all workers at once; an ended episode is
        followed by the next one's first observation. An action None leaves its environment alone
        (None comes back); rlplastic.envs.atari.SAMPLE draws from the environment's action space."""
        for worker, connection in enumerate(self._connections):
            connection.send(("step", [a for i, a in enumerate(actions) if self._owner[i] == worker]))
        answers = [self._receive(worker) for worker in range(len(self._connections))]
        return [answers[self._owner[i]][self._local[i]] for i in range(len(actions))]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for worker, connection in enumerate(self._connections):
            try:
                connection.send(("close", None))
                self._receive(worker)
            except (OSError, EOFError, RuntimeError):
                pass
        for process in self._processes:
            process.join(timeout=10)
