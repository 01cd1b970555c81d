"""Stop a run cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption, e.g. SLURM's).

While `StopSignals` is active, either signal only asks the loop to stop: it finishes the optimizer step
under way, saves a checkpoint and returns. A second Ctrl-C raises KeyboardInterrupt at once, for when
waiting is not wanted; the checkpoints already saved stay whole (saves are atomic).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)


class StopSignals:
    """A context in which SIGINT and SIGTERM set `received` instead of ending the process."""

    def __init__(self):
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only the main thread may install handlers
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):  # SIGUSR2: submitit's preemption
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a data loader worker forked from us: the main process decides
            return
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: stop waiting
            return
        self.received = signal.Signals(signum)
        again = " (Ctrl-C again to abort at once)" if signum == signal.SIGINT else ""
        log.warning("%s received: finishing the current step, then saving a checkpoint%s", self.received.name, again)
