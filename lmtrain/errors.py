"""User-facing errors: a mistake in the config or the data, reported as one readable line, never a traceback.

Every command runs inside `reports_user_errors`, the one boundary where an error or a stop becomes an exit
status. A single run exits (2 for a user error, 3 for a divergence, 4 when a distributed run lost one of its
ranks, 128 + the signal for a stop). A job of a Hydra multirun ends instead, so the other jobs of the sweep
still run: its status.json records how, and the sweep's summary reports it (lmtrain.runs.sweeps.callback,
which also sets the sweep's exit status). A search sweeper (Optuna) scores its jobs, so there the error is
also raised to Hydra, and the trial counts as failed.
"""

from __future__ import annotations

import errno
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
    """Training diverged: a non-finite loss or gradient norm that rolling back could not recover, or a final
    objective that is not a finite number."""

    exit_code = 3  # neither a user mistake (2) nor a crash (1): the run itself went wrong
    status = "diverged"


class LostRank(LmtrainError):
    """A distributed run lost one of its processes: a rank died or stopped answering. The rank that noticed first
    says which; the others raise it with an empty message, which the boundary does not print."""

    exit_code = 4  # not the user's mistake (2), nor this process's crash (1): another process failed


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


def is_search(sweeper_target: str) -> bool:
    """Whether a sweeper (its `_target_`) searches, scoring each job (Optuna), rather than running a grid: a failed
    job must reach it as a failure. Hydra's basic sweeper only stops at the first failure and prints it again."""
    return not sweeper_target.endswith("BasicSweeper")


def in_search() -> bool:
    """Whether this process runs a job of a multirun whose sweeper searches (see is_search)."""
    from hydra.core.hydra_config import HydraConfig

    return in_multirun() and is_search(str(HydraConfig.get().sweeper.get("_target_", "")))


# What to do about a filesystem failure, by errno; the message names the path.
_FILESYSTEM_FIXES = {
    errno.ENOSPC: "the disk is full: free space there (or point the path at another disk), then run the command "
                  "again; a training run continues from its last checkpoint with trainer.resume=auto",
    errno.EDQUOT: "the disk quota is used up: free space there (or point the path at another disk), then run the "
                  "command again; a training run continues from its last checkpoint with trainer.resume=auto",
    errno.EFBIG: "the file is larger than this filesystem allows: point the path at another filesystem",
    errno.EROFS: "the filesystem is read-only: point the path at a writable folder",
    errno.EACCES: "permission denied: make it writable (chmod) or point the path at a folder of your own",
    errno.EPERM: "permission denied: make it writable (chmod) or point the path at a folder of your own",
    errno.ENOTDIR: "a file stands where a folder should be: move that file away or choose another path",
    errno.EISDIR: "a folder stands where a file should be: give a file path, or move the folder away",
    errno.EEXIST: "something already exists at that path: move it away or choose another path",
    errno.ENOENT: "it does not exist: check the path",
}


def filesystem_error(e: OSError) -> str:
    """An OSError as one line: what failed, on which path, and what to do about it."""
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None) or "(no path given)"
    fix = _FILESYSTEM_FIXES.get(e.errno, "check that the path is reachable and writable")
    return f"{e.strerror or e} at {paths}: {fix}"


def _end_job(message: str, cause: BaseException) -> None:
    """A sweep job that failed, its message logged and its status.json written: it ends here (returns nothing to
    Hydra), or, under a search sweeper, the failure is raised to it (lmtrain's sweep callback keeps Hydra from
    printing it again)."""
    if in_search():
        raise JobFailed(message) from cause


def reports_user_errors(fn: F) -> F:
    """Run a command; on an LmtrainError log its message, then exit with its code (a sweep job: see _end_job).

    An unexpected exception under multirun goes into the job's log with its traceback, and ends the job.
    HYDRA_FULL_ERROR=1 re-raises, so the whole traceback shows, as it does for Hydra's own errors.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LmtrainError as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            if str(e):  # an empty message: another rank has said it (LostRank, RunStopped on ranks other than 0)
                (log.warning if isinstance(e, RunStopped) else log.error)("%s", e)
            if in_multirun():
                return _end_job(f"{e.status}: {e}", e)
            sys.exit(e.exit_code)
        except OSError as e:  # the one boundary for filesystem failures: one line naming the path and the fix
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            log.error("%s", filesystem_error(e))
            if in_multirun():
                return _end_job(f"failed: {filesystem_error(e)}", e)
            sys.exit(USER_ERROR_EXIT)
        except Exception as e:
            if not in_multirun() or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            log.exception("The job failed with an unexpected error")
            return _end_job(f"failed: {type(e).__name__}: {e}", e)

    return wrapper  # type: ignore[return-value]
