"""Who this process is in a distributed run: its rank, its device, the process group it joins.

A run of N processes ("ranks") is described by torchrun's environment variables (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which `lmtrain train trainer.nproc_per_node=N`
and torchrun both set; under a plain `srun` they are derived from SLURM's own variables (slurm.py, ranks.py).
Everything here is torch.distributed: gloo on the CPU, NCCL on CUDA. With one process no group is created and
every collective (lmtrain.distributed.collectives) is a cheap no-op, so the single-process path stays as it was.
Torch is imported only by what needs it, so that `lmtrain train` knows it is a lone process (ranks.py) and
reports a config error without waiting for torch.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import TYPE_CHECKING

from lmtrain.distributed.ranks import World, world_from_env
from lmtrain.distributed.slurm import torchrun_variables
from lmtrain.errors import ConfigError, LostRank

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


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

    for key, value in torchrun_variables(os.environ).items():
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
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                    device_id=device if device.type == "cuda" else None)
        except dist.DistError as e:  # DistStoreError: the other ranks never came to the rendezvous
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise LostRank(f"rank {world.rank} waited trainer.dist_timeout_s={timeout_s:g} s at {where} for the "
                           f"{world.size} ranks of the run, and not all of them came ({str(e).splitlines()[0]}): "
                           "every rank must be started (torchrun on every node, or srun)") from None
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
