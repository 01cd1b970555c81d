"""Signals: acknowledged the moment they arrive, even while the main thread is inside one long call."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time

import torch

from lmtrain.training.signals import StopSignals


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


class _StopAfter:
    """Validation batches that ask the run to stop once `after` of them have been read."""

    def __init__(self, stop: StopSignals, after: int):
        self.stop, self.after, self.read = stop, after, 0

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, i: int):
        self.read += 1
        if self.read == self.after:
            self.stop.received = signal.SIGTERM
        x = torch.randint(0, 10, (2, 8))
        return x, x


def test_an_evaluation_stops_at_its_next_batch_after_a_signal():
    from lmtrain.config import ModelConfig
    from lmtrain.model import GPT
    from lmtrain.training.loop import Trainer
    from lmtrain.training.memory import MicroBatches
    from lmtrain.training.precision import PrecisionChoice, TrainingPrecision

    trainer = Trainer.__new__(Trainer)  # only what evaluate() reads: the rest of a Trainer needs data
    trainer.model = trainer.forward = GPT(ModelConfig(vocab_size=10, d_model=8, n_heads=2, n_layers=1, d_ff=16,
                                                      block_size=8))
    trainer.device, trainer.stop = torch.device("cpu"), StopSignals()
    trainer.precision = TrainingPrecision(PrecisionChoice("fp32", "test"), trainer.device)
    trainer.micro = MicroBatches(batch_size=2, size=2, device=trainer.device)
    trainer.val_batches = _StopAfter(trainer.stop, after=3)
    assert trainer.evaluate() is None  # cut short: not a validation loss to record
    assert trainer.val_batches.read == 3 and trainer.model.training


def test_ctrl_c_delivered_twice_at_once_counts_once_and_a_later_one_aborts(caplog):
    """Under torchrun, Ctrl-C reaches every worker twice, from the terminal and from torchrun: that is one press."""
    with caplog.at_level(logging.WARNING), StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the copy torchrun passes on, a few milliseconds later
        time.sleep(0.2)
        assert stop.received == signal.SIGINT
        stop.received_at -= 2  # a second press, two seconds after the first
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            aborted = False
        except KeyboardInterrupt:
            aborted = True
    assert aborted
    assert sum("SIGINT received: stopping after this step" in r.getMessage() for r in caplog.records) == 1
