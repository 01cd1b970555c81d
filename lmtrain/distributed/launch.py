"""Starting the processes of a distributed run, making every rank agree on one run directory, and the
launcher part of a resume command.

Three ways in, one behaviour:
- `lmtrain train trainer.nproc_per_node=N`: the Hydra job composes the config and makes the run dir once,
  then starts N workers (workers.py). Workers do not run Hydra: they get the checked config and the run dir,
  and return how the run ended; the job reports it as for one process.
- `torchrun ... -m lmtrain train` and `srun ... lmtrain train`: every rank runs Hydra itself. Before it
  composes, `shared_run_dir_overrides` names the run dir after one start time that all ranks agree on
  through torchrun's store (`${now:}` differs between processes), or, under SLURM, puts the run in
  outputs/slurm/<job id>, which a requeued job finds again; ranks other than 0 write no .hydra/ folder
  and no log file. A hydra.run.dir given on the command line wins.
A worker of either launcher stops (and saves) when its launcher dies: `die_with_launcher`. A job that was
requeued, or whose workers were restarted, continues its checkpoint: `resume_after_restart`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import torch

from lmtrain.config import TrainConfig
from lmtrain.distributed.slurm import check_started_by_srun
from lmtrain.distributed.world import cpu_count, pick_device, world_from_env
from lmtrain.errors import ConfigError

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


Entry = Callable[[TrainConfig, Path], Outcome]  # trains in one process: lmtrain.commands.train.train_here


def start(entry: Entry, cfg: TrainConfig, run_dir: Path, nproc: int, lock_fds: tuple[int, ...] = ()) -> Outcome:
    """Train with `entry`: in `nproc` new worker processes on this node, or (nproc 1) in this process, which may
    itself be one rank that torchrun or srun started. lock_fds: the run folder's locked descriptors, which the
    workers inherit, so that the folder stays locked until the last of them exits."""
    if nproc > 1:
        from lmtrain.distributed.workers import start_workers

        return start_workers(entry, cfg, run_dir, nproc, lock_fds)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank torchrun started: it stops (and saves) if torchrun dies
        if world_from_env().main:  # rank 0 alone prints the resume command
            os.environ[_TORCHRUN] = json.dumps(_torchrun_options())  # read now, while torchrun is there to read
        die_with_launcher(os.getppid())
    if world_from_env().rank != 0:  # rank 0 alone writes the log file (submitit's tasks each run Hydra's set-up)
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
    return entry(cfg, run_dir)


def resume_after_restart(cfg: TrainConfig, restart: int = 0, previous_status: dict | None = None) -> None:
    """A job that SLURM or submitit requeued, or whose workers were restarted after a failure (`restart` > 0:
    trainer.max_restarts; torchrun --max-restarts), continues its checkpoint. previous_status: the run folder's
    status.json as the last attempt left it, `requeued` after a submitit requeue."""
    slurm = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    elastic = restart or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    requeued = (previous_status or {}).get("status") == "requeued"
    if cfg.trainer.resume is not None or not (slurm or elastic or requeued):
        return
    cfg.trainer.resume = "auto"
    if slurm:
        who = f"SLURM requeued this job (restart {slurm})"
    elif requeued:
        who = f"submitit requeued this job after {previous_status.get('signal', 'a preemption signal')}"
    else:
        who = f"The workers were restarted after a failure (restart {elastic})"
    log.info("%s: continuing from the last checkpoint (trainer.resume=auto)", who)


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
    if n == 1:
        check_started_by_srun(os.environ)
    return n


_TORCHRUN = "LMTRAIN_TORCHRUN_OPTIONS"  # the options of the torchrun that started this rank, as a JSON list


def _torchrun_options() -> list[str]:
    """The options this rank's torchrun was started with, read from its command line (it is this process's
    parent); from torchrun's variables when that cannot be read."""
    import psutil

    try:
        parent = psutil.Process().parent().cmdline()
    except (psutil.Error, AttributeError):
        parent = []
    for i, arg in enumerate(parent):
        if os.path.basename(arg) == "torchrun" or arg in ("torch.distributed.run", "torch.distributed.launch"):
            rest = parent[i + 1:]
            entry = next((j for j, a in enumerate(rest) if a == "-m" or os.path.basename(a) == "lmtrain"), len(rest))
            return rest[:entry]
    nodes = os.environ.get("GROUP_WORLD_SIZE", "1")
    return ["--standalone" if nodes == "1" else f"--nnodes={nodes}",
            f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '1')}"]


def launcher_prefix() -> list[str]:
    """The launcher part of the command that started this rank, for a resume command that keeps the world:
    torchrun with its own options, or an srun line with the step's nodes, tasks and CPUs per task; empty for
    one process and for trainer.nproc_per_node (its overrides keep the number)."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        options = json.loads(env[_TORCHRUN]) if _TORCHRUN in env else _torchrun_options()
        return ["torchrun", *options, "-m"]
    if int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1:
        line = ["srun", f"--nodes={env.get('SLURM_STEP_NUM_NODES', env.get('SLURM_JOB_NUM_NODES', '1'))}",
                f"--ntasks={env['SLURM_STEP_NUM_TASKS']}"]
        if "SLURM_CPUS_PER_TASK" in env:
            line.append(f"--cpus-per-task={env['SLURM_CPUS_PER_TASK']}")
        return line
    return []


def die_with_launcher(launcher: int) -> None:
    """This worker stops when the process that started it dies, however it dies (SIGKILL too): it gets SIGTERM,
    so it saves at the end of its step like any stopped run, then exits. On Linux the kernel sends it (prctl's
    parent-death signal: immediate, and no thread to run); elsewhere a thread checks the parent once a second."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0:
            if os.getppid() != launcher:  # it died before the kernel was told
                os.kill(os.getpid(), signal.SIGTERM)
            return

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="lmtrain-launcher-watch", daemon=True).start()


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


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
