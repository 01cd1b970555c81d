"""A run folder: one run per folder, one process at a time, and no folder left behind by a start that failed.

`lmtrain train` calls `open_run_dir` around everything it does. On the way in it refuses a fresh start in
a folder that already holds a run (checkpoints or metrics), unless `trainer.resume` continues it or
`trainer.overwrite=true` replaces it, and takes the folder's lock: an flock on the folder itself, released
by the kernel when that process dies, however it dies, and a file beside it naming the PID that trains there.
A lock file left by a dead process is taken over with a warning. On the way out, a failed start (a config
error, a checkpoint refused, a dataset that cannot be loaded, Ctrl-C while preparing) removes the folder
if this start created it and training never began in it (with Hydra's outputs/ folders it leaves empty); a
folder the user already had is never removed, and a run that trained keeps its folder and train.log.
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
from lmtrain.runs.loggers import close_open
from lmtrain.runs.records import WANDB_RUN_ID

log = logging.getLogger(__name__)

LOCK = ".lmtrain.lock"
_HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}

# Run folders named on the command line (see `note_existing`), and those of them that existed already.
_NAMED: set[Path] = set()
_EXISTED: set[Path] = set()


def note_existing(argv: list[str]) -> None:
    """Before Hydra creates the `hydra.run.dir=` (or, with -m, `hydra.sweep.dir=`) folder: refuse one that cannot
    be created or written (a file in the way, a read-only folder) in one line, and remember a run folder that
    exists already: such a folder is the user's, even when it is empty, and a failed start must not remove it."""
    keys = ("hydra.run.dir", "hydra.sweep.dir") if {"-m", "--multirun"} & set(argv) else ("hydra.run.dir",)
    for arg in argv:
        key, _, value = arg.partition("=")
        key = key.lstrip("+")
        if key not in keys or not value or "${" in value:
            continue
        folder = Path(os.path.expanduser(value)).absolute()
        existing = next(p for p in [folder, *folder.parents] if p.exists())
        if not existing.is_dir():
            raise ConfigError(f"{key}={value}: {existing} is a file, not a folder; choose another folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}={value}: {existing} is not writable; choose a folder you can write")
        if key == "hydra.run.dir":
            _NAMED.add(folder.resolve())
            if folder.is_dir():
                _EXISTED.add(folder.resolve())


def holds_run(folder: Path) -> bool:
    """Whether a folder holds a run's results: checkpoints, or logged metrics."""
    metrics = folder / "metrics.jsonl"
    return (folder / "checkpoints").is_dir() or (metrics.is_file() and metrics.stat().st_size > 0)


def training_began(folder: Path) -> bool:
    """Whether a run trained in the folder: it holds results, or its metrics.jsonl, which is opened just before
    the first step, exists (a run that crashed before logging a step keeps its folder and train.log)."""
    return holds_run(folder) or (folder / "metrics.jsonl").exists()


def only_scaffolding(folder: Path) -> bool:
    """Whether a folder holds nothing but what a start writes before doing any work: Hydra's .hydra/ files,
    log files, the lock and status.json."""
    for entry in folder.iterdir():
        if entry.name == ".hydra" and entry.is_dir():
            if not {p.name for p in entry.iterdir()} <= _HYDRA_FILES:
                return False
        elif entry.name in (LOCK, "status.json"):  # status.json: how the start failed (sweeps/status.py)
            continue
        elif not (entry.suffix == ".log" and entry.is_file()):
            return False
    return True


def _fresh(folder: Path) -> bool:
    """Whether this start created the folder: not named on the command line as an existing folder, and it
    holds nothing but this start's scaffolding, with empty logs (an earlier start would have logged)."""
    if folder.resolve() in _EXISTED or not only_scaffolding(folder):
        return False
    return all(p.stat().st_size == 0 for p in folder.glob("*.log"))


class RunLock:
    """The folder's lock, held for as long as this process trains there.

    The lock is an flock on the run folder itself (its directory), which the kernel releases when the process
    dies, however it dies; deleting or replacing `.lmtrain.lock`, which names the holder, cannot release it.
    The lock file is flock-ed too: on a filesystem that cannot lock a directory (NFS emulates flock with
    fcntl locks, which need a file open for writing) that is the lock, and it keeps out older lmtrain versions.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fds: list[int] = []  # the folder's and the lock file's descriptors, while held

    def acquire(self) -> None:
        folder_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(folder_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(folder_fd)
            self._refuse()
        except OSError:  # this filesystem cannot lock a directory: the lock file alone locks
            os.close(folder_fd)
            folder_fd = None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            for held in (folder_fd, fd):
                if held is not None:
                    os.close(held)
            self._refuse()
        left = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if left:
            log.warning("Taking over the lock of %s, left by %s, which is no longer running", self.folder, left)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fds = [fd] if folder_fd is None else [folder_fd, fd]

    def _refuse(self) -> None:
        try:
            holder = self.path.read_text(errors="replace").strip()[:200] or "another process"
        except OSError:  # the lock file was deleted: the folder's own lock still says it is taken
            holder = "another process"
        raise ConfigError(f"{self.folder} is in use: {holder} is training there now; wait for it to finish, or "
                          "start this run in another folder (hydra.run.dir=...)")

    def filenos(self) -> tuple[int, ...]:
        """The locked descriptors (the folder's and the lock file's) while held: a worker process that inherits
        copies of them holds the lock too."""
        return tuple(self._fds)

    def release(self) -> None:
        if self._fds:
            self.path.unlink(missing_ok=True)  # still locked: nobody else can have taken it meanwhile
            for fd in reversed(self._fds):
                os.close(fd)
            self._fds = []


def _clear_previous_run(folder: Path) -> None:
    """trainer.overwrite=true: remove the earlier run's results, so the folder holds one run."""
    log.warning("trainer.overwrite=true: deleting the earlier run's checkpoints and metrics in %s", folder)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    (folder / "metrics.jsonl").unlink(missing_ok=True)
    (folder / WANDB_RUN_ID).unlink(missing_ok=True)  # the new run is a new W&B run too


def _remove_failed_start(folder: Path) -> None:
    """Remove the folder and, unless it was named on the command line, the folders above it (Hydra's outputs/DATE/
    and outputs/) that it leaves empty, up to the working folder; a named folder's parents are the user's."""
    folder = folder.resolve()
    shutil.rmtree(folder, ignore_errors=True)
    if folder in _NAMED:
        return
    here = Path.cwd().resolve()
    for parent in folder.parents:
        if parent == here or not parent.is_relative_to(here):
            break
        try:
            parent.rmdir()  # only when empty: another run's folder keeps it
        except OSError:
            break


def _run_dir_given() -> bool:
    """Whether this start's run folder was named (hydra.run.dir on the command line, or by torchrun's or SLURM's
    shared folder), or is a sweep job's: one a later start finds again, so trainer.resume=auto has a meaning."""
    from hydra.core.hydra_config import HydraConfig

    from lmtrain.errors import in_multirun

    if not HydraConfig.initialized() or in_multirun():
        return True
    return any(o.lstrip("+").startswith("hydra.run.dir=") for o in HydraConfig.get().overrides.hydra)


def _nothing_to_resume(folder: Path) -> str:
    """trainer.resume=auto in the new folder Hydra made for this start: the command that names a run instead."""
    import shlex
    import sys

    runs = [p.parent.parent for p in folder.parent.parent.glob("*/*/checkpoints/latest.json")
            if p.parent.parent.resolve() != folder.resolve()]
    newest = max(runs, key=lambda p: (p / "checkpoints" / "latest.json").stat().st_mtime, default=None)
    here = Path.cwd()
    target = os.path.relpath(newest, here) if newest is not None else "RUN_FOLDER"
    command = shlex.join(["lmtrain", "train", *sys.argv[1:], f"hydra.run.dir={target}"])
    which = "the newest run with a checkpoint there" if newest is not None else "the folder of the run to continue"
    return (f"trainer.resume=auto: {os.path.relpath(folder, here)} is the new folder Hydra made for this start, so "
            f"there is nothing in it to resume; name the run to continue ({which}): {command}")


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
        close_open()  # the trackers of a run that failed in this process, before their folders may go
        run.lock.release()
        if run.fresh and not keep_on_failure and not training_began(run.folder) and _owns_run_dir():
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
        if resume == "auto" and self.fresh and not _run_dir_given():
            raise ConfigError(_nothing_to_resume(self.folder))
        if resume is None and holds_run(self.folder):
            if not overwrite:
                raise ConfigError(f"{self.folder} already holds a run (checkpoints or metrics); continue it with "
                                  "trainer.resume=auto, start elsewhere with another hydra.run.dir=..., or replace "
                                  "it with trainer.overwrite=true")
            _clear_previous_run(self.folder)
