"""A run folder: one run per folder, one process at a time, and no folder left behind by a start that failed.

`lmtrain train` calls `open_run_dir` around everything it does. On the way in it refuses a fresh start in
a folder that already holds a run (checkpoints or metrics), unless `trainer.resume` continues it or
`trainer.overwrite=true` replaces it, and takes the folder's lock: a file naming the PID that trains
there, held with flock so it is released by the kernel when that process dies, however it dies. A lock
file left by a dead process is taken over with a warning. On the way out, a failed start (a config
error, a checkpoint refused, a dataset that cannot be loaded, Ctrl-C while preparing) removes the folder
if this start created it and nothing of value has been written to it; a folder the user already had is
never removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from lmtrain.errors import ConfigError

log = logging.getLogger(__name__)

LOCK = ".lmtrain.lock"
_HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}

# Run folders named on the command line (see `note_existing`), and those of them that existed already.
_NAMED: set[Path] = set()
_EXISTED: set[Path] = set()


def note_existing(argv: list[str]) -> None:
    """Before Hydra creates the `hydra.run.dir=` folder: refuse one that cannot be created (a file in the way, a
    read-only parent) in one line, and remember one that exists already: such a folder is the user's, even when
    it is empty, and a failed start must not remove it."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") != "hydra.run.dir" or not value or "${" in value:
            continue
        folder = Path(os.path.expanduser(value)).absolute()
        _NAMED.add(folder.resolve())
        if folder.is_dir():
            _EXISTED.add(folder.resolve())
            continue
        existing = next(p for p in [folder, *folder.parents] if p.exists())
        if not existing.is_dir():
            raise ConfigError(f"hydra.run.dir={value}: {existing} is a file, not a folder; choose another run folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"hydra.run.dir={value}: {existing} is not writable; choose a run folder you can write")


def holds_run(folder: Path) -> bool:
    """Whether a folder holds a run's results: checkpoints, or logged metrics."""
    metrics = folder / "metrics.jsonl"
    return (folder / "checkpoints").is_dir() or (metrics.is_file() and metrics.stat().st_size > 0)


def only_scaffolding(folder: Path) -> bool:
    """Whether a folder holds nothing but what a start writes before doing any work: Hydra's .hydra/ files,
    empty log files, the lock, status.json and an empty metrics.jsonl."""
    for entry in folder.iterdir():
        if entry.name == ".hydra" and entry.is_dir():
            if not {p.name for p in entry.iterdir()} <= _HYDRA_FILES:
                return False
        elif entry.name in (LOCK, "status.json"):  # status.json: how the start failed (sweeps/status.py)
            continue
        elif entry.suffix in (".log", ".jsonl") and entry.is_file():
            if entry.stat().st_size > 0 and entry.suffix == ".jsonl":
                return False
        else:
            return False
    return True


def _fresh(folder: Path) -> bool:
    """Whether this start created the folder: not named on the command line as an existing folder, and it
    holds nothing but this start's scaffolding, with empty logs (an earlier start would have logged)."""
    if folder.resolve() in _EXISTED or not only_scaffolding(folder):
        return False
    return all(p.stat().st_size == 0 for p in folder.glob("*.log"))


class RunLock:
    """The folder's lock file, flock-ed for as long as this process trains there."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"{self.path.parent} is in use: {holder} is training there now; wait for it to "
                              "finish, or start this run in another folder (hydra.run.dir=...)") from None
        left = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if left:
            log.warning("Taking over the lock of %s, left by %s, which is no longer running", self.path.parent, left)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def fileno(self) -> int | None:
        """The locked file's descriptor while held: a worker process that inherits a copy holds the lock too."""
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # still locked: nobody else can have taken it meanwhile
            os.close(self._fd)
            self._fd = None


def _clear_previous_run(folder: Path) -> None:
    """trainer.overwrite=true: remove the earlier run's results, so the folder holds one run."""
    log.warning("trainer.overwrite=true: deleting the earlier run's checkpoints and metrics in %s", folder)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    (folder / "metrics.jsonl").unlink(missing_ok=True)


def _remove_failed_start(folder: Path) -> None:
    named = folder.resolve() in _NAMED
    shutil.rmtree(folder, ignore_errors=True)
    if not named:  # Hydra's outputs/DATE/ once its last run folder is gone; a named folder's parent is the user's
        with contextlib.suppress(OSError):
            folder.parent.rmdir()


def _owns_run_dir() -> bool:
    """Whether this process owns the run folder: torchrun or srun start every rank as a whole `lmtrain train`,
    all sharing rank 0's folder, so rank 0 alone locks it, guards it and cleans it up."""
    from lmtrain.distributed.world import world_from_env  # imported late: config errors stay fast

    return world_from_env().rank == 0


@contextlib.contextmanager
def open_run_dir(folder: Path, keep_on_failure: bool = False) -> Iterator[RunDir]:
    """The run folder for one start: `claim` it once the config is known; on failure, a folder this start
    created and left without results is removed, unless `keep_on_failure` (a sweep job's folder records how
    the job ended)."""
    run = RunDir(Path(folder))
    try:
        yield run
    except BaseException:
        run.lock.release()
        if run.fresh and not keep_on_failure and only_scaffolding(run.folder) and _owns_run_dir():
            _remove_failed_start(run.folder)
        raise
    run.lock.release()


class RunDir:
    def __init__(self, folder: Path):
        self.folder = folder
        self.fresh = folder.is_dir() and _fresh(folder)
        self.lock = RunLock(folder)

    def claim(self, resume: str | None, overwrite: bool) -> None:
        """Lock the folder for this process, and refuse to start a new run over an earlier one. Only the
        folder's owner does (see `_owns_run_dir`): the other ranks of a run share its lock."""
        if not _owns_run_dir():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        if resume is None and holds_run(self.folder):
            if not overwrite:
                raise ConfigError(f"{self.folder} already holds a run (checkpoints or metrics); continue it with "
                                  "trainer.resume=auto, start elsewhere with another hydra.run.dir=..., or replace "
                                  "it with trainer.overwrite=true")
            _clear_previous_run(self.folder)
