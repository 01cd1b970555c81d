"""Starting the processes of a distributed run, and making every rank agree on one run directory.

Three ways in, one behaviour:
- `lmtrain train trainer.nproc_per_node=N`: the Hydra job composes the config and makes the run dir once,
  then starts N workers with torch.distributed's elastic launch API. Workers do not run Hydra: they get
  the checked config and the run dir, and return how the run ended; the job reports it as for one process.
- `torchrun ... -m lmtrain train` and `srun ... lmtrain train`: every rank runs Hydra itself. Before it
  composes, `shared_run_dir_overrides` names the run dir after one start time that all ranks agree on
  through torchrun's store (`${now:}` differs between processes), or, under SLURM, puts the run in
  outputs/slurm/<job id>, which a requeued job finds again; ranks other than 0 write no .hydra/ folder
  and no log file. A hydra.run.dir given on the command line wins.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import torch

from lmtrain.config import TrainConfig
from lmtrain.distributed.world import cpu_count, pick_device, world_from_env
from lmtrain.errors import USER_ERROR_EXIT, ConfigError, Diverged, LmtrainError

log = logging.getLogger(__name__)

_NO_JOB = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--multirun", "-m", "--shell-completion",
           "-sc", "--resolve")


@dataclass
class Outcome:
    """How one process's training ended, as plain values that cross process boundaries."""

    val_loss: float = float("nan")
    best_val_loss: float = float("inf")
    steps: int = 0  # the optimizer step reached
    stopped_by: int | None = None  # the signal number when stopped early and saved
    interrupted: bool = False  # a second Ctrl-C: stopped at once


Entry = Callable[[TrainConfig, Path], Outcome]  # trains in one process: lmtrain.training.run.run_training


def start(entry: Entry, cfg: TrainConfig, run_dir: Path, nproc: int) -> Outcome:
    """Train with `entry`: in `nproc` new worker processes on this node, or (nproc 1) in this process, which may
    itself be one rank that torchrun or srun started."""
    if nproc > 1:
        return start_workers(entry, cfg, run_dir, nproc)
    if world_from_env().rank != 0:  # rank 0 alone writes the log file (submitit's tasks each run Hydra's set-up)
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
    return entry(cfg, run_dir)


def resume_after_restart(cfg: TrainConfig) -> None:
    """A job that SLURM requeued, or that elastic launch restarted after a failure, continues its checkpoint."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) or \
        int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restarts > 0 and cfg.trainer.resume is None:
        cfg.trainer.resume = "auto"
        who = "SLURM requeued this job" if os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0") \
            else "Elastic launch restarted the workers"
        log.info("%s (restart %d): continuing from the last checkpoint (trainer.resume=auto)", who, restarts)


def processes_to_start(nproc_per_node: str, device: str) -> int:
    """How many workers `lmtrain train` starts itself: 1 when torchrun or srun already started this process."""
    if device != "auto":
        pick_device(device)  # a device this machine lacks is refused naming trainer.device, not nproc_per_node
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    gpus = torch.cuda.device_count() if cuda else 0
    n = (gpus or 1) if nproc_per_node == "auto" else int(nproc_per_node)
    if n > 1 and world_from_env().size > 1:
        raise ConfigError(f"trainer.nproc_per_node={nproc_per_node}, but this process is already one of "
                          f"{world_from_env().size} started by torchrun or srun; leave trainer.nproc_per_node at 1")
    if cuda and n > gpus:
        raise ConfigError(f"trainer.nproc_per_node={nproc_per_node} but only {gpus} GPUs are visible here")
    if not cuda and n > 1:
        cores = cpu_count()
        if n > cores:
            raise ConfigError(f"trainer.nproc_per_node={nproc_per_node} starts {n} CPU processes (no GPU here), more "
                              f"than this machine's {cores} cores: use at most {cores}, or a GPU")
        log.warning("trainer.nproc_per_node=%s without a GPU: %d CPU processes share %d cores (gloo); rarely faster "
                    "than one process, but it runs the distributed code", nproc_per_node, n, cores)
    return n


# --- trainer.nproc_per_node: this process starts the workers --------------------------------------------


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


def _worker(entry: Entry, cfg: TrainConfig, run_dir: Path) -> Outcome:
    """One worker process of `trainer.nproc_per_node`; its exit status tells elastic launch how it ended."""
    _configure_worker_logging(run_dir)
    try:
        resume_after_restart(cfg)
        return entry(cfg, run_dir)
    except LmtrainError as e:
        log.error("%s", e)
        sys.exit(e.exit_code)  # 2 for a user error, 3 for a divergence
    except torch.distributed.DistError as e:
        log.error("Rank %s lost contact with the other ranks (one of them failed or stopped): %s",
                  os.environ.get("RANK", "?"), str(e).splitlines()[0])
        sys.exit(1)


def _forward_to_workers(signum: int, frame) -> None:
    """SIGTERM or SIGUSR2 reaching the launcher (a scheduler's preemption) goes on to every worker, which all
    stop at the same step and save. Ctrl-C reaches the workers from the terminal directly."""
    import psutil

    for child in psutil.Process().children():
        try:
            if any("spawn_main" in part for part in child.cmdline()):
                child.send_signal(signum)
        except psutil.Error:
            pass


def start_workers(entry: Entry, cfg: TrainConfig, run_dir: Path, nproc: int) -> Outcome:
    """Run `entry` in `nproc` worker processes on this node; returns rank 0's outcome."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"lmtrain-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=cfg.trainer.max_restarts,
                          monitor_interval=0.5, signals_to_handle="SIGHUP,SIGQUIT")
    log.info("Starting %d worker processes (trainer.nproc_per_node=%s)", nproc, cfg.trainer.nproc_per_node)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _forward_to_workers)
    signal.signal(signal.SIGUSR2, _forward_to_workers)
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):  # their failure reports are ours to give
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # Each attempt gets a store of its own: in the agent's shared store, workers restarted after a failure
    # would find the dead attempt's gloo addresses and fail to connect.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    try:
        outcomes = elastic_launch(config, _worker)(entry, cfg, run_dir)
    except ChildFailedError as e:
        # A user error (or a divergence) on one rank makes the others lose contact and fail too, in the same
        # second: the rank that said what was wrong decides the exit status, whichever was noticed first.
        said = {r: f for r, f in e.failures.items() if f.exitcode in (USER_ERROR_EXIT, Diverged.exit_code)}
        rank, failure = min((said or e.failures).items(), key=lambda kv: kv[1].timestamp)
        code = failure.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        if code in (USER_ERROR_EXIT, Diverged.exit_code):
            sys.exit(code)  # the worker has said what was wrong
        log.error("Rank %d %s; the other workers were stopped", rank, how)
        sys.exit(1)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return outcomes[0]


# --- torchrun and srun: every rank runs Hydra ---------------------------------------------------------------


def shared_run_dir_overrides(argv: list[str]) -> list[str]:
    """Overrides that make this rank of a torchrun- or srun-started run share rank 0's run directory."""
    world = world_from_env()
    if world.size == 1 or any(a in _NO_JOB or a.startswith("--cfg=") for a in argv):
        return []
    overrides = [] if world.rank == 0 else ["hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]"]
    if any(a.startswith("hydra.run.dir=") for a in argv):
        return overrides
    if "SLURM_JOB_ID" in os.environ:  # stable across requeues, and the same on every task
        return overrides + [f"hydra.run.dir=outputs/slurm/{os.environ['SLURM_JOB_ID']}"]
    return overrides + [f"hydra.run.dir=outputs/{_shared_start():%Y-%m-%d/%H-%M-%S}"]  # train.yaml's pattern


def _shared_start() -> datetime:
    """One start time for every rank, so the run dir named after it is one folder: the first rank to reach
    torchrun's store sets it (each rank's own clock could straddle a second)."""
    from torch.distributed import TCPStore

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        raise ConfigError("several processes but no torchrun to agree on a run directory: give every rank the same "
                          "hydra.run.dir=...")
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     timeout=timedelta(seconds=300))  # torchrun's own store, which every worker may use
    stamp = store.compare_set("lmtrain/start_time", "", str(datetime.now().timestamp())).decode()
    return datetime.fromtimestamp(float(stamp))
