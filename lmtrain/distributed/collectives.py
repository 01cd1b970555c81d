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


class StepAgreement:
    """Once per optimizer step: the loss averaged over the ranks, and whether any rank was asked to stop.

    Both travel in one small all-reduce of (loss, one slot per signal number), which never waits for the
    device: the flags are read one step late. The reduced flags of step s are copied to host memory behind
    step s's work (pinned, with an event, on CUDA) and read at step s + 1, once that copy is done, while the
    device works through step s + 1. So a signal that reaches any rank during step s stops every rank after
    step s + 1, the same step everywhere; with one process there is no lag. The largest signal number
    received wins the report, as Python numbers them.
    """

    SLOTS = 65  # signal numbers 1-64 (Linux's real-time signals end at 64); slot 0 holds the loss

    def __init__(self, device: torch.device):
        self.device = device
        self._last: tuple[torch.Tensor, torch.cuda.Event | None] | None = None  # last step's flags, host side
        # CUDA: two pinned host buffers and their events, used in turn (step s's is read at step s + 1)
        self._host: list[tuple[torch.Tensor, torch.cuda.Event]] = []

    def __call__(self, step_loss: torch.Tensor, received: signal.Signals | None
                 ) -> tuple[torch.Tensor, signal.Signals | None]:
        if not active():
            return step_loss, received
        both = torch.zeros(self.SLOTS, device=self.device)  # a fill on the device: no copy from the host
        both[0] = step_loss.float()
        if received is not None:
            both[int(received)] = 1.0
        dist.all_reduce(both)
        last, self._last = self._last, self._to_host(both)
        return both[0] / dist.get_world_size(), None if last is None else self._read(*last)

    def _to_host(self, both: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if both.device.type != "cuda":
            return both, None
        if not self._host:
            self._host = [(torch.empty(both.shape, dtype=both.dtype, pin_memory=True), torch.cuda.Event())
                          for _ in range(2)]
        self._host.reverse()  # the other buffer: the last one is still to be read
        host, done = self._host[0]
        host.copy_(both, non_blocking=True)
        done.record()
        return host, done

    @staticmethod
    def _read(flags: torch.Tensor, done: torch.cuda.Event | None) -> signal.Signals | None:
        if done is not None:
            done.synchronize()  # the previous step's all-reduce and copy: the device is already past them
        numbers = flags.numpy()[1:].nonzero()[0] + 1  # host memory, read as numpy: not a device read
        return signal.Signals(int(numbers.max())) if len(numbers) else None


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
