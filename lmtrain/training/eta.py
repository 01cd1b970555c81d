"""How long a run has left, from the pace of the steps this process has trained: for the plain log lines,
which have no progress bar and its ETA column."""

from __future__ import annotations

import time


def duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `2 h 07 min`, `3 d 4 h`: short, and exact to what matters at each scale."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


class Eta:
    """Seconds per step over this process's steps so far (evaluations and saves included: wall time), times
    the steps left."""

    def __init__(self, first_step: int, total_steps: int):
        self.first_step, self.total_steps = first_step, total_steps
        self.start = time.perf_counter()

    def seconds_per_step(self, step: int) -> float | None:
        done = step - self.first_step
        return (time.perf_counter() - self.start) / done if done > 0 else None

    def remaining(self, step: int) -> float | None:
        per_step = self.seconds_per_step(step)
        return None if per_step is None else per_step * (self.total_steps - step)

    def text(self, step: int) -> str:
        left = self.remaining(step)
        return "-" if left is None else duration(left)

    def first_step_note(self, step: int, slow: float = 10.0) -> str | None:
        """After this process's first step, when it was slow: the pace so far, before any log line is due."""
        per_step = self.seconds_per_step(step)
        if step != self.first_step + 1 or per_step is None or per_step < slow:
            return None
        return (f"The first step took {duration(per_step)}; at that pace the {self.total_steps - step:,} steps left "
                f"take about {duration(per_step * (self.total_steps - step))}")
