"""Who this process is in a distributed run, and the few collectives the training loop needs.

A run of N processes ("ranks") is described by torchrun's environment variables (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which `lmtrain train trainer.nproc_per_node=N`
and torchrun both set; under a plain `srun` they are derived from SLURM's own variables. Everything
here is torch.distributed: gloo on the CPU, NCCL on CUDA. With one process no group is created and
every function below is a cheap no-op, so the single-process path stays exactly what it was.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from lmtrain.errors import ConfigError

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


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def share_cpu(world: World) -> None:
    """Split the CPU's cores between the ranks on this node, so that N processes do not each start a thread
    per core and thrash; never more than one thread per rank when there are as many ranks as cores."""
    cores = _cpu_count()
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
    if world.size == 1:
        return f"Strategy {strategy}: one process on {device}"
    backend = dist.get_backend() if dist.is_initialized() else "-"
    return (f"Strategy {strategy}: {world.size} processes on {world.nodes} node{'s' if world.nodes > 1 else ''} "
            f"({world.local_size} per node, {backend}), rank 0 on {device}")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


@contextmanager
def local_main_first(world: World, long_timeout_s: float = 24 * 3600) -> Iterator[None]:
    """Local rank 0 of each node runs the block first (tokenizing data into the node's cache, say); the
    others wait, then run it and find the work done. The wait has its own long timeout: preparing a large
    corpus may take hours, far more than a training collective should ever wait."""
    if not active():
        yield
        return
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=long_timeout_s))
    if world.local_rank != 0:
        dist.barrier(group=group)
    yield
    if world.local_rank == 0:
        dist.barrier(group=group)
    dist.destroy_process_group(group)


def agree(step_loss: torch.Tensor, received: signal.Signals | None) -> tuple[torch.Tensor, signal.Signals | None]:
    """Once per optimizer step: the loss averaged over all ranks, and whether any rank was asked to stop.

    Every rank gets the same answers, so all of them stop after the same step. One small all-reduce carries
    both; a second one, only when stopping, agrees on which signal to report (the largest number wins).
    """
    if not active():
        return step_loss, received
    both = torch.stack([step_loss.float(), torch.tensor(float(received or 0), device=step_loss.device)])
    dist.all_reduce(both)
    loss = both[0] / dist.get_world_size()
    if both[1].item() == 0:
        return loss, None
    number = torch.tensor(int(received or 0), device=step_loss.device)
    dist.all_reduce(number, op=dist.ReduceOp.MAX)
    return loss, signal.Signals(int(number.item()))


def smallest(value: int, device: torch.device) -> int:
    """The smallest of every rank's value (itself with one process)."""
    if not active():
        return value
    t = torch.tensor(value, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def sum_across(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of a tensor over all ranks (itself with one process)."""
    if active():
        t = t.clone()
        dist.all_reduce(t)
    return t


def gather_to_main(obj: object) -> list[object]:
    """Every rank's object, in rank order, on rank 0 (an empty list elsewhere); [obj] with one process."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def from_main(obj: object) -> object:
    """Rank 0's object on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
