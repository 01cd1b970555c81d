"""Signals: acknowledged the moment they arrive, even while the main thread is inside one long call."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time

from lmtrain.signals import StopSignals


def test_a_signal_is_acknowledged_while_the_main_thread_is_busy(caplog):
    libc = ctypes.CDLL(None)
    previous = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.WARNING), StopSignals() as stop:
        # The signal goes to another thread, so the main thread's C call (a stand-in for one long training
        # step) is not interrupted, and Python cannot run its handler until that call returns.
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
        try:
            threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
            libc.usleep(3_000_000)  # ctypes releases the GIL; the handler waits for the call to return
            returned = time.time()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
        time.sleep(0.01)  # the handler runs at the next bytecode boundary
        assert stop.received == signal.SIGTERM
    acknowledged = [r for r in caplog.records if "SIGTERM received: stopping after this step" in r.getMessage()]
    assert len(acknowledged) == 1 and acknowledged[0].created < returned
    assert acknowledged[0].threadName == "lmtrain-signals"
    assert signal.getsignal(signal.SIGTERM) == previous and signal.set_wakeup_fd(-1) == -1  # all put back
