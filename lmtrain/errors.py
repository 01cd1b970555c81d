"""User-facing errors: a mistake in the config or the data, reported as one readable line, never a traceback."""

from __future__ import annotations

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


class ConfigError(LmtrainError):
    """An invalid configuration value or combination."""


class DataError(LmtrainError):
    """Input data that cannot be used: a missing file, a missing column, too little text."""


class CheckpointError(LmtrainError):
    """A checkpoint that is missing, corrupt or does not fit the model."""


def reports_user_errors(fn: F) -> F:
    """Run a command; on an LmtrainError log its message and exit with USER_ERROR_EXIT.

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
            sys.exit(USER_ERROR_EXIT)

    return wrapper  # type: ignore[return-value]
