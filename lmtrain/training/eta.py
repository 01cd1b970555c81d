"""How long a run has left, from the recent pace of the steps this process has trained: the one ETA that the
progress bar and the log lines show."""

from __future__ import annotations

from lmtrain.training.clock import RunClock


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
    """Steps left times the recent pace: what the progress bar's ETA and the log lines' ETA both show.

    The pace is the moving average of the settled training steps' time (RunClock.step_ema, recent steps weighing
    most, so the ETA follows a change of speed within a few dozen steps, where a whole-run average lags for
    hours), plus what evaluations, saves and samples have added per step so far (they recur, so their whole-run
    average is the right share). Before a step has settled: the plain wall-clock pace of this process's steps.
    """

    def __init__(self, clock: RunClock, first_step: int, total_steps: int):
        self.clock, self.first_step, self.total_steps = clock, first_step, total_steps

    def seconds_per_step(self, step: int) -> float | None:
        done = step - self.first_step
        if done <= 0:
            return None
        wall = self.clock.elapsed()
        if self.clock.step_ema is None:
            return wall / done
        between_steps = wall - self.clock.seconds["warm-up"] - self.clock.seconds["train"]
        return self.clock.step_ema + max(0.0, between_steps) / done

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
