"""Where a run's wall time goes, and tokens/s over training time only.

The first steps of a run are slow for reasons that are not training speed: torch.compile compiles, the
allocator and thread pools warm up, kernels are selected. They count as warm-up until the step time
settles: a step is settled once the step before it took at most SETTLED_RATIO times as long (so the
slow first step, and a second compile on the next, stay out). Evaluation, saving and sampling are timed
as their own phases. Tokens/s (and so MFU) counts settled training steps only; the summary shows the
whole wall time split into warm-up, train, eval, save, sample and the rest.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

SETTLED_RATIO = 1.5  # the previous step took at most this many times as long: the step time has settled
MAX_WARMUP_STEPS = 50  # a machine too noisy to ever look settled still gets figures after this many steps
RECENT_WEIGHT = 0.05  # the newest settled step's weight in the moving average of step time: ~the last 40 steps


class RunClock:
    """Call `step(tokens)` after each optimizer step and wrap non-training work in `phase(name)`."""

    def __init__(self):
        self.start = self._last = time.perf_counter()
        self.seconds = {"warm-up": 0.0, "train": 0.0}  # phase name -> seconds, in the order first seen
        self.train_tokens = 0  # tokens of settled steps
        self._steps, self._previous, self.settled = 0, None, False
        self._window_tokens, self._window_seconds = 0, 0.0
        self.step_ema: float | None = None  # seconds per settled training step, recent steps weighing most

    def step(self, tokens: int) -> None:
        now = time.perf_counter()
        duration, self._last = now - self._last, now
        self._steps += 1
        if not self.settled and self._previous is not None:
            self.settled = self._previous <= SETTLED_RATIO * duration or self._steps > MAX_WARMUP_STEPS
        self._previous = duration
        if self.settled:
            self.step_ema = duration if self.step_ema is None else self.step_ema + RECENT_WEIGHT * (
                duration - self.step_ema)
            self.seconds["train"] += duration
            self.train_tokens += tokens
            self._window_tokens += tokens
            self._window_seconds += duration
        else:
            self.seconds["warm-up"] += duration

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time spent inside counts as `name` (eval, save, sample), not as the next step's."""
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + spent
            self._last += spent

    def rate(self) -> float | None:
        """Tokens/s over the settled steps since the last call; None while no step has settled."""
        if self._window_seconds <= 0:
            return None
        rate = self._window_tokens / self._window_seconds
        self._window_tokens, self._window_seconds = 0, 0.0
        return rate

    def overall_rate(self) -> float | None:
        """Tokens/s over every settled step of the run so far."""
        return self.train_tokens / self.seconds["train"] if self.seconds["train"] > 0 else None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def split(self) -> str:
        """The wall time so far and where it went: '12.3 s: warm-up 2.0, train 9.1, eval 0.8, other 0.4'."""
        wall = self.elapsed()
        parts = [f"{name} {seconds:.1f}" for name, seconds in self.seconds.items() if seconds > 0 or name == "train"]
        other = wall - sum(self.seconds.values())
        return f"{wall:.1f} s: " + ", ".join([*parts, f"other {max(other, 0.0):.1f}"])
