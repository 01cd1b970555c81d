"""User-facing errors: a mistake in the config or the data, reported as one readable line, never a traceback."""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("lmtrain")

F = TypeVar("F", bound=Callable)

# Exit status for a user mistake (bad config, missing file); 1 stays with Hydra's own errors and crashes.
USER_ERROR_EXIT = 2


class LmtrainError(Exception):
    """A problem the user can fix; the message says what and, where it applies, which config key."""

    exit_code = USER_ERROR_EXIT


class ConfigError(LmtrainError):
    """An invalid configuration value or combination."""


class DataError(LmtrainError):
    """Input data that cannot be used: a missing file, a missing column, too little text."""


class CheckpointError(LmtrainError):
    """A checkpoint that is missing, corrupt or does not fit the model."""


class TrainingDiverged(LmtrainError):
    """The loss or gradient norm became non-finite and could not be recovered by rolling back."""

    exit_code = 3


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


def reports_user_errors(fn: F) -> F:
    """Run a command; on an LmtrainError log its message and exit with its exit code (USER_ERROR_EXIT for most).

    Every OSError (full disk, read-only folder, a file where a folder should be) ends the same way, as one
    line naming the path and the fix: the one boundary for filesystem failures.

    HYDRA_FULL_ERROR=1 re-raises, so the whole traceback shows, as it does for Hydra's own errors.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LmtrainError as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            log.error("%s", e)
            sys.exit(e.exit_code)
        except OSError as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            log.error("%s", filesystem_error(e))
            sys.exit(USER_ERROR_EXIT)

    return wrapper  # type: ignore[return-value]
