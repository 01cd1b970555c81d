"""Stop a run cleanly on SIGINT (Ctrl-C), SIGTERM (a scheduler's preemption, e.g. SLURM's) or SIGUSR2.

While `StopSignals` is active, either signal only asks the loop to stop: it finishes the optimizer step
under way (an evaluation stops at its next batch), saves a checkpoint and returns. A second Ctrl-C
raises KeyboardInterrupt, for when waiting is not wanted; the checkpoints already saved stay whole
(saves are atomic). A copy of the first signal arriving within a second is that same signal delivered twice
(Ctrl-C under torchrun reaches the workers from the terminal and from torchrun) and counts once.

Python runs signal handlers only between bytecodes of the main thread, so during one long step (a large
model on a CPU: minutes) the handler would wait for the step to end. The C-level handler also writes the
signal's number to `signal.set_wakeup_fd`'s pipe at once, and a small thread reading that pipe prints
the acknowledgment the moment the signal arrives.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

log = logging.getLogger(__name__)

# SIGUSR2: submitit's preemption notice (or the signal SUBMITIT_PREEMPT_SIGNAL names: USR1, say)
_PREEMPT = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
HANDLED = tuple(dict.fromkeys([signal.SIGINT, signal.SIGTERM, signal.SIGUSR2, _PREEMPT]))
# A second Ctrl-C this soon after the first is the same press delivered twice: the terminal signals torchrun and
# its workers alike, and torchrun passes its own copy on to them
REPEAT_WINDOW_S = 1.0


class StopSignals:
    """A context in which SIGINT and SIGTERM set `received` instead of ending the process."""

    def __init__(self):
        self.received: signal.Signals | None = None
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self._previous: dict[signal.Signals, object] = {}
        self._pid = os.getpid()
        self._pipe: tuple[int, int] | None = None
        self._previous_wakeup = -1
        self._announced: tuple[signal.Signals, float] | None = None  # the first signal announced, and when

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only the main thread may install handlers
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
            self._watch()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            os.close(self._pipe[1])  # the watcher reads end-of-file and ends
            self._pipe = None

    def _watch(self) -> None:
        """Start the thread that acknowledges a signal as soon as it arrives, even inside a long step."""
        read, write = os.pipe()
        os.set_blocking(write, False)
        try:
            self._previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        except ValueError:  # not the main thread of the main interpreter
            os.close(read)
            os.close(write)
            return
        self._pipe = (read, write)
        threading.Thread(target=self._acknowledge, args=(read,), name="lmtrain-signals", daemon=True).start()

    def _acknowledge(self, read: int) -> None:
        try:
            while data := os.read(read, 64):
                for signum in data:
                    if signum in HANDLED and os.getpid() == self._pid:
                        self._announce(signal.Signals(signum))
        finally:
            os.close(read)

    def _announce(self, sig: signal.Signals) -> None:
        now = time.monotonic()
        if self._announced is None:
            self._announced = (sig, now)
            again = " (Ctrl-C again to abort once the step under way returns)" if sig == signal.SIGINT else ""
            log.warning("%s received: stopping after this step, then saving a checkpoint%s", sig.name, again)
        elif sig == signal.SIGINT and not (self._announced[0] == sig and now - self._announced[1] < REPEAT_WINDOW_S):
            log.warning("SIGINT received again: aborting as soon as the step under way returns")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a data loader worker forked from us: the main process decides
            return
        if self._pipe is None:  # no watcher thread: acknowledge here
            self._announce(signal.Signals(signum))
        if self.received is not None:
            repeat = signum == self.received and time.monotonic() - self.received_at < REPEAT_WINDOW_S
            if signum == signal.SIGINT and not repeat:
                raise KeyboardInterrupt  # the second Ctrl-C: stop waiting
            return
        self.received, self.received_at = signal.Signals(signum), time.monotonic()
