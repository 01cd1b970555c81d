"""User-facing errors: a mistake in the config or the data, reported as one readable line, never a traceback.

Every command runs inside `reports_user_errors`, the one boundary where an error or a stop becomes an exit
status. A single run exits (2 for a user error, 128 + the signal for a stop); under a Hydra multirun the
same error is raised to Hydra instead, so the other jobs of the sweep still run and the sweeper (Optuna,
say) records this job as failed.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

from hydra.errors import CompactHydraException

log = logging.getLogger("lmtrain")

F = TypeVar("F", bound=Callable)

# Exit status for a user mistake (bad config, missing file); 1 stays with Hydra's own errors and crashes.
USER_ERROR_EXIT = 2


class LmtrainError(Exception):
    """A problem the user can fix; the message says what and, where it applies, which config key."""

    exit_code = USER_ERROR_EXIT
    status = "failed"  # what a sweep's status.json and summary call the job


class ConfigError(LmtrainError):
    """An invalid configuration value or combination."""


class DataError(LmtrainError):
    """Input data that cannot be used: a missing file, a missing column, too little text."""


class CheckpointError(LmtrainError):
    """A checkpoint that is missing, corrupt or does not fit the model."""


class Diverged(LmtrainError):
    """Training ended with a loss that is not a finite number."""

    status = "diverged"


class RunStopped(LmtrainError):
    """A run stopped cleanly by a signal before its last step; its checkpoint resumes it."""

    status = "stopped"

    def __init__(self, received: signal.Signals, message: str):
        super().__init__(message)
        self.received = received
        self.exit_code = 128 + received  # as a shell reports a process ended by that signal: 130, 143


class JobFailed(CompactHydraException):
    """What Hydra receives from a sweep job that failed: printed as its message alone, never a traceback."""


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (a sweep), under any launcher."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def reports_user_errors(fn: F) -> F:
    """Run a command; on an LmtrainError log its message, then exit with its code (raise under multirun).

    An unexpected exception under multirun goes into the job's log with its traceback, then to Hydra.
    HYDRA_FULL_ERROR=1 re-raises, so the whole traceback shows, as it does for Hydra's own errors.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LmtrainError as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            (log.warning if isinstance(e, RunStopped) else log.error)("%s", e)
            if in_multirun():
                raise JobFailed(f"{e.status}: {e}") from e
            sys.exit(e.exit_code)
        except Exception:
            if in_multirun():
                log.exception("The job failed with an unexpected error")
            raise

    return wrapper  # type: ignore[return-value]
