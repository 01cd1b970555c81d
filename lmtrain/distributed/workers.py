"""`lmtrain train trainer.nproc_per_node=N`: this process starts N workers on this node and watches them.

The workers are started with torch.distributed's elastic launch API, one attempt at a time: a failure names
the rank and how it failed (`Rank 1 was killed by SIGKILL`), and restarts them all from the last checkpoint up
to trainer.max_restarts times, saying so; a user error (exit 2), a divergence (3) or a lost rank (4, which a
worker has named already) is reported as it is. The first SIGTERM or SIGUSR2 that reaches this launcher goes
on to every worker once. Each worker stops when this process dies, and holds a copy of the run folder's
locked file, so the folder stays locked until the last worker has exited.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from multiprocessing.reduction import DupFd
from pathlib import Path
from typing import TYPE_CHECKING

from lmtrain.config import TrainConfig
from lmtrain.distributed.launch import Entry, Outcome, die_with_launcher, resume_after_restart
from lmtrain.distributed.world import cpu_count
from lmtrain.errors import USER_ERROR_EXIT, Diverged, LmtrainError, LostRank

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

log = logging.getLogger(__name__)


def _configure_worker_logging(run_dir: Path) -> None:
    """What Hydra's job_logging gives the job: the console handler (INFO on rank 0 only) and, on rank 0, the
    run's train.log, appended to after the launching job's own lines."""
    from lmtrain.console import make_console_handler, quiet_libraries

    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(make_console_handler())
    if int(os.environ.get("RANK", "0")) == 0:
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(file)
    for name in ("httpx", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet_libraries()


class _Inherited:
    """File descriptors that each spawned worker receives copies of (multiprocessing passes them when it pickles
    the worker's arguments): the copies share the open files, and with them their flocks, until the last of them
    is closed."""

    def __init__(self, fds: tuple[int, ...]):
        self.fds = list(fds)

    def __reduce__(self):
        return _received, tuple(DupFd(fd) for fd in self.fds)


def _received(*dups) -> list[int]:
    return [dup.detach() for dup in dups]  # the descriptors' numbers in this process, left open


def _worker(entry: Entry, cfg: TrainConfig, run_dir: Path, restart: int, lock: list[int],
            launcher: int) -> Outcome:
    """One worker process of `trainer.nproc_per_node`; its exit status tells the launcher how it ended. lock: its
    copies of the run folder's locked descriptors (see _Inherited), which keeps the folder locked while it lives."""
    die_with_launcher(launcher)
    _configure_worker_logging(run_dir)
    try:
        resume_after_restart(cfg, restart)
        outcome = entry(cfg, run_dir)
        for sig in (signal.SIGTERM, signal.SIGUSR2):  # the run is over: a late stop signal has nothing to stop
            signal.signal(sig, signal.SIG_IGN)
        if os.getppid() != launcher:  # orphaned: nobody will collect the outcome, and elastic would wait for that
            sys.exit(128 + outcome.stopped_by if outcome.stopped_by else 0)
        return outcome
    except LmtrainError as e:
        if str(e):
            log.error("%s", e)
        sys.exit(e.exit_code)  # 2 for a user error, 3 for a divergence, 4 for a lost rank
    except Exception:
        log.exception("Training failed with an unexpected error")
        sys.exit(1)


class _ForwardOnce:
    """The launcher's SIGTERM and SIGUSR2 handler: the first such signal (a scheduler's preemption) goes on to every
    worker, which all stop at the same step and save. Later ones are not passed on: the workers are stopping
    already, and one that has finished training no longer handles them (submitit_local, for one, sends its own
    SIGUSR2 at the time limit, whatever happened before). Ctrl-C reaches the workers from the terminal directly."""

    def __init__(self):
        self.forwarded: int | None = None

    def __call__(self, signum: int, frame) -> None:
        import psutil

        if self.forwarded is not None:
            log.info("%s received; the workers are stopping already", signal.Signals(signum).name)
            return
        self.forwarded = signum
        for child in psutil.Process().children():
            try:
                if any("spawn_main" in part for part in child.cmdline()):
                    child.send_signal(signum)
            except psutil.Error:
                pass


def _first_failure(failures: dict[int, ProcessFailure]) -> tuple[int, ProcessFailure]:
    """The failure that caused the others: a rank that reported another's loss (LostRank) only followed it."""
    causes = {r: f for r, f in failures.items() if f.exitcode != LostRank.exit_code} or failures
    return min(causes.items(), key=lambda kv: kv[1].timestamp)


def _describe(rank: int, code: int) -> str:
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    return f"Rank {rank} {how}"


def start_workers(entry: Entry, cfg: TrainConfig, run_dir: Path, nproc: int, lock_fds: tuple[int, ...] = ()) -> Outcome:
    """Run `entry` in `nproc` worker processes on this node; returns rank 0's outcome. A failure restarts them all
    (from the last checkpoint) up to trainer.max_restarts times, each restart logged with the rank and how it
    failed; a user error or a divergence is not retried."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    log.info("Starting %d worker processes (trainer.nproc_per_node=%s)", nproc, cfg.trainer.nproc_per_node)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    forward = _ForwardOnce()
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGUSR2, forward)
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):  # their failure reports are ours to give
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # Each attempt gets a store of its own: in the agent's shared store, workers restarted after a failure
    # would find the dead attempt's gloo addresses and fail to connect.
    # As torchrun does: each worker's thread pools sized from its start (torch, NumPy, tokenizers), not only
    # once world.share_cpu runs: N workers each starting a pool per core would thrash while they set up.
    worker_env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                  "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, cpu_count() // nproc)))}
    saved_env = {key: os.environ.get(key) for key in worker_env}
    os.environ.update(worker_env)  # the workers inherit this process's environment
    restarts = cfg.trainer.max_restarts
    try:
        for restart in range(restarts + 1):
            config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                                  run_id=f"lmtrain-{uuid.uuid4().hex[:8]}", rdzv_endpoint="localhost:0",
                                  max_restarts=0, monitor_interval=0.1,  # torchrun's: a cheap poll of the workers
                                  signals_to_handle="SIGHUP,SIGQUIT")
            lock = _Inherited(lock_fds)
            try:
                return elastic_launch(config, _worker)(entry, cfg, run_dir, restart, lock, os.getpid())[0]
            except ChildFailedError as e:
                if forward.forwarded and all(f.exitcode == -forward.forwarded for f in e.failures.values()):
                    # the signal passed on ended workers that were not training (still setting up, or exiting):
                    # a stop all the same, with whatever was saved before
                    return Outcome(stopped_by=forward.forwarded)
                # A user error (or a divergence) on one rank makes the others lose contact and fail too, in the
                # same second: the rank that said what was wrong decides the exit status, whichever was noticed first
                said = {r: f for r, f in e.failures.items() if f.exitcode in (USER_ERROR_EXIT, Diverged.exit_code)}
                rank, failure = _first_failure(said or e.failures)
                code = failure.exitcode
                if code in (USER_ERROR_EXIT, Diverged.exit_code):
                    sys.exit(code)  # the worker has said what was wrong, and trying again would not help
                what = "a rank was lost (see above)" if code == LostRank.exit_code else _describe(rank, code)
                if restart < restarts:
                    log.warning("%s; restarting all workers from the last checkpoint (restart %d of %d)",
                                what[0].upper() + what[1:], restart + 1, restarts)
                    continue
                if code != LostRank.exit_code:
                    log.error("%s; the other workers were stopped", what)
                sys.exit(code if code == LostRank.exit_code else 1)
        raise AssertionError("unreachable: the last attempt returns or exits")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for key, value in saved_env.items():  # a torchrun started later from this process needs the shared store
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
