"""Step schedules used by the agents."""

from __future__ import annotations

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
