"""A job its scheduler stops before the time limit goes back in the queue, once lmtrain has saved.

submitit (hydra/launcher=submitit_slurm or submitit_local, and lmtrain's `slurm` preset) warns a job with
SIGUSR2 (or the signal SUBMITIT_PREEMPT_SIGNAL names) before its time limit. Its own handler would pickle
the job again and requeue it at once; while lmtrain trains, StopSignals holds that signal instead: every
rank stops after the same step and saves. Only then is submitit's handler, put back when training ended,
called. On the task of global rank 0 it requeues the job and ends the process (submitit_local: exit 144,
which its controller answers by starting the job again; SLURM: `scontrol requeue`); on the other tasks it
returns. The next attempt reads `requeued` in the run folder's status.json (under SLURM also
SLURM_RESTART_COUNT) and continues from the checkpoint.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

log = logging.getLogger(__name__)


def submitit_handler(sig: signal.Signals) -> Callable | None:
    """submitit's preemption handler, when this process is a submitit job and `sig` is the signal it requeues on."""
    handler = signal.getsignal(sig)
    owner = getattr(handler, "__self__", None)
    return handler if owner is not None and type(owner).__module__.startswith("submitit.") else None


def requeue(sig: signal.Signals, before: Callable[[], None]) -> str | None:
    """Hand a run that `sig` stopped (and that saved) to submitit's handler, after calling `before`. When the job
    is requeued the handler ends this process; otherwise this returns why not (None on tasks other than rank 0,
    whose task requeues the whole job)."""
    handler = submitit_handler(sig)
    if handler is None:
        return "this is no submitit job"
    # A second copy of the signal (submitit_local sends its own at the time limit, whatever came before) must not
    # run the handler again halfway through this call: it waits, and is then ignored
    signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
    try:
        before()
        handler(sig, None)
    except Exception as e:  # submitit's UncompletedJobError: timed out too many times, or nothing to checkpoint
        return str(e) or type(e).__name__
    finally:
        signal.signal(sig, signal.SIG_IGN)  # the job is handed over: later copies mean nothing
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    return None
