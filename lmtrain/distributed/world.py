"""Who this process is in a distributed run: its rank, its device, the process group it joins.

A run of N processes ("ranks") is described by torchrun's environment variables (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which `lmtrain train trainer.nproc_per_node=N`
and torchrun both set; under a plain `srun` they are derived from SLURM's own variables. Everything
here is torch.distributed: gloo on the CPU, NCCL on CUDA. With one process no group is created and every
collective (lmtrain.distributed.collectives) is a cheap no-op, so the single-process path stays as it was.
Who this process is comes from the environment alone: torch is imported only by what needs it, so that
`lmtrain train` knows it is a lone process (and reports a config error) without waiting for torch.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from lmtrain.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0  # this process's index among all processes
    local_rank: int = 0  # its index on this node: which GPU it drives
    size: int = 1  # processes in the run
    local_size: int = 1  # processes on this node

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes logs, metrics, progress and (unsharded) checkpoints."""
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.size // max(1, self.local_size))

    def rows(self, batch: int) -> slice:
        """This rank's rows of a global batch: disjoint, in rank order, as even as `batch` allows."""
        return slice(self.rank * batch // self.size, (self.rank + 1) * batch // self.size)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-005,010],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if m is None:
        return nodelist
    prefix, ranges = m[1], m[2]
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def slurm_environment(env: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables derived from SLURM's, for processes started by `srun` itself (one task per GPU).

    Empty when torchrun's variables are already there (torchrun inside srun) or SLURM did not start
    several tasks.
    """
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return {}
    # e.g. "4(x2),2": tasks per node; the first entry is this job's usual count
    local_size = re.match(r"\d+", env.get("SLURM_TASKS_PER_NODE", env.get("SLURM_NTASKS", "1")))
    job = int(env.get("SLURM_JOB_ID", "0"))
    return {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_WORLD_SIZE": local_size[0] if local_size else "1",
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "localhost")),
            "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + job % 20000)}  # same on every task of a job


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    env = os.environ if env is None else env
    env = {**env, **slurm_environment(env)}
    size = int(env.get("WORLD_SIZE", "1"))
    return World(rank=int(env.get("RANK", "0")), local_rank=int(env.get("LOCAL_RANK", "0")), size=size,
                 local_size=int(env.get("LOCAL_WORLD_SIZE", str(size))))


def pick_device(setting: str, key: str = "trainer.device") -> torch.device:
    """The device `setting` names (auto: CUDA when there is a GPU, else the CPU), refused by name where absent."""
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={setting} but CUDA is not available here; use {key}=auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"{key}={setting}: this machine has {torch.cuda.device_count()} CUDA devices (0 to "
                          f"{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}={setting} but Apple's MPS is not available here; use {key}=auto or cpu")
    return device


def cpu_count() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def share_cpu(world: World) -> None:
    """Split the CPU's cores between the ranks on this node, so that N processes do not each start a thread
    per core and thrash; never more than one thread per rank when there are as many ranks as cores."""
    import torch

    cores = cpu_count()
    threads = max(1, cores // world.local_size)
    if world.local_size > 1 and torch.get_num_threads() > threads:
        torch.set_num_threads(threads)
        log.info("%d processes share %d CPU cores on this node: %d torch thread%s each", world.local_size, cores,
                 threads, "" if threads == 1 else "s")


def setup(device: torch.device, timeout_s: float, group_of_one: bool = False) -> tuple[World, torch.device]:
    """Join the process group (when there are several processes) and pick this rank's device: its own GPU
    (LOCAL_RANK) when `device` is CUDA. group_of_one: a one-process group all the same (FSDP2 needs one).

    timeout_s bounds every collective: a rank that died makes the others fail after at most that long,
    never hang.
    """
    import torch
    import torch.distributed as dist

    for key, value in slurm_environment(os.environ).items():
        os.environ.setdefault(key, value)
    world = world_from_env()
    if world.size == 1:
        if group_of_one and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1)
        return world, device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {world.local_rank} has no GPU: this node shows {torch.cuda.device_count()};"
                              " start at most that many processes per node")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    else:
        share_cpu(world)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return world, device


def describe(world: World, strategy: str, device: torch.device) -> str:
    """The start-up line that says how the run is spread."""
    import torch.distributed as dist

    if world.size == 1:
        return f"Strategy {strategy}: one process on {device}"
    backend = dist.get_backend() if dist.is_initialized() else "-"
    return (f"Strategy {strategy}: {world.size} processes on {world.nodes} node{'s' if world.nodes > 1 else ''} "
            f"({world.local_size} per node, {backend}), rank 0 on {device}")


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
