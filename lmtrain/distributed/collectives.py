"""The few collectives the training loop needs; each is a cheap no-op with one process.

Every rank calls them at the same point of the loop, so they also keep the ranks in step: all of them
stop after the same step, score the same validation batches and save the same checkpoint.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from lmtrain.distributed.world import World


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


def gather_everywhere(obj: object) -> list[object]:
    """Every rank's object, in rank order, on every rank; [obj] with one process."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_main(obj: object) -> object:
    """Rank 0's object on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
