"""Step schedules used by the agents."""

from __future__ import annotations

import math
from dataclasses import dataclass


def linearly_decaying_epsilon(step: int, warmup_steps: int, decay_steps: int, final_epsilon: float) -> float:
    """dopamine's schedule: 1.0 during warm-up, then linear to `final_epsilon` over `decay_steps`."""
    if decay_steps <= 0:
        return 1.0 if step < warmup_steps else final_epsilon
    steps_left = decay_steps + warmup_steps - step
    bonus = (1.0 - final_epsilon) * steps_left / decay_steps
    return final_epsilon + min(max(bonus, 0.0), 1.0 - final_epsilon)


@dataclass
class LinearEpsilon:
    """linearly_decaying_epsilon with its settings: epsilon = schedule(agent steps taken so far)."""

    warmup_steps: int
    decay_steps: int
    final_epsilon: float

    def __call__(self, step: int) -> float:
        return linearly_decaying_epsilon(step, self.warmup_steps, self.decay_steps, self.final_epsilon)


def annealed(step: int, period: int, start: float, end: float) -> float:
    """BBF's exponential_decay_scheduler: geometric interpolation from start to end over period."""
    frac = min(max(1.0 - step / period, 0.0), 1.0)
    return math.exp(frac * (math.log(start) - math.log(end)) + math.log(end))


class ResetSchedule:
    """When BBF (agents/bbf.py) resets, exactly as the reference's agent decides it (spr_agent.BBFAgent._train_step
    and reset_weights): with t the agent steps taken so far, a reset is considered when
    t > next_reset (first next_reset = interval); it sets next_reset = t + interval and is skipped
    when that lies beyond no_resets_after. In a 100k run at 20k steps: t = 20,001, 40,002, 60,003
    (three resets); at t = 80,004 the next one would fall after 100k, so none. The 2023 code
    (rule "2023") compared t >= next_reset: t = 20,000, 40,000, 60,000 and 80,000 (next 100,000,
    not beyond): four resets, the last 20k steps before the end."""

    state_keys = ("next_reset", "resets_done")

    def __init__(self, interval: int, no_resets_after: int, rule: str = "2024"):
        self.interval, self.no_resets_after, self.rule = interval, no_resets_after, rule
        self.next_reset, self.resets_done = interval, 0

    def due(self, steps_taken: int) -> bool:
        not_yet = steps_taken < self.next_reset if self.rule == "2023" else steps_taken <= self.next_reset
        if self.interval <= 0 or not_yet:
            return False
        self.next_reset = steps_taken + self.interval
        if self.next_reset > self.no_resets_after:
            return False
        self.resets_done += 1
        return True

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in self.state_keys}

    def load_state_dict(self, state: dict) -> None:
        for key in self.state_keys:
            setattr(self, key, int(state[key]))
