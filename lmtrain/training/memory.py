"""Micro-batches that fit in memory: `trainer.micro_batch_size`, and peak CUDA memory for the log.

Each batch the loader hands out (trainer.batch_size sequences) goes through the model in micro-batches
of `size` sequences, their gradients accumulated. The optimizer step, and therefore the training, is
the same whatever the micro-batch: only the order of float sums changes. So when a step runs out of
memory, the step is simply done again with half the micro-batch (accumulation doubles, the global batch
stays), and `micro_batch_size=auto` on CUDA starts from the largest micro-batch that survives a trial
forward and backward at start-up. Sizes are always divisors of batch_size, so every micro-batch of a
run has one shape (one compiled graph).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from lmtrain.distributed.ranks import World
from lmtrain.errors import LmtrainError

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]  # (input, target), each (B, T)


class OutOfMemory(LmtrainError):
    """Even one sequence per micro-batch does not fit."""


def configured_size(setting: str | None, batch_size: int) -> int | None:
    """trainer.micro_batch_size as a number of sequences: None for auto, batch_size when unset."""
    if setting is None:
        return batch_size
    return None if setting == "auto" else int(setting)


def next_smaller(size: int, batch_size: int) -> int | None:
    """The largest divisor of batch_size at most half of size; None below 1."""
    return next((d for d in range(size // 2, 0, -1) if batch_size % d == 0), None)


def _free_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class MicroBatches:
    """Cuts each loaded batch into micro-batches of `size` sequences; halves `size` after an out-of-memory error
    (with one process: under several, see `run`)."""

    def __init__(self, batch_size: int, size: int, device: torch.device, world: World | None = None):
        self.batch_size, self.size, self.device, self.world = batch_size, size, device, world or World()

    def split(self, loaded: list[Batch]) -> list[Batch]:
        """Micro-batches of each (input, target) batch, in order; row slices of a contiguous (pinned) batch stay
        contiguous (and pinned)."""
        return [(x[i:i + self.size], y[i:i + self.size]) for x, y in loaded for i in range(0, x.shape[0], self.size)]

    def accumulation(self, grad_accum_steps: int) -> int:
        """Forward passes per optimizer step."""
        return grad_accum_steps * (self.batch_size // self.size)

    def run(self, step: Callable[[list[Batch]], torch.Tensor], loaded: list[Batch], optimizer: torch.optim.Optimizer,
            at_step: int) -> torch.Tensor:
        """`step(micro_batches)` (forward and backward of each); after an out-of-memory error the partial
        gradients are dropped and the same batches go again in micro-batches half the size.

        Not with several processes: the others are already inside this step's collectives (DDP's bucketed
        all-reduce, FSDP2's gathers), which one rank cannot redo alone, and stopping them all to agree on a new
        size would cost a collective every step. So the run stops at once, saying which micro-batch to resume
        with; micro_batch_size=auto picks one that fits on every rank at start-up."""
        while True:
            try:
                return step(self.split(loaded))
            except torch.OutOfMemoryError:
                pass  # out of the except block first: the error's traceback holds the failed step's activations
            optimizer.zero_grad(set_to_none=True)
            if self.world.size > 1:
                raise OutOfMemory(self._advice(at_step))
            self._halve(f"step {at_step + 1} ran out of memory")

    def _advice(self, at_step: int) -> str:
        smaller = next_smaller(self.size, self.batch_size)
        fix = (f"continue with trainer.resume=auto trainer.micro_batch_size={smaller} (the global batch stays the "
               "same), or trainer.micro_batch_size=auto, which finds a size that fits on every rank at start-up"
               if smaller else "use a smaller model or model.block_size, or trainer.activation_checkpointing=true")
        return (f"rank {self.world.rank} ran out of memory in step {at_step + 1} at micro-batch {self.size}; under "
                f"{self.world.size} processes one rank cannot redo a step alone (the others are in its collectives), "
                f"so the run stops: {fix}")

    def _halve(self, why: str) -> None:
        _free_cached_memory(self.device)
        smaller = next_smaller(self.size, self.batch_size)
        if smaller is None:
            raise OutOfMemory(f"{why} even at trainer.micro_batch_size=1; use a smaller model or "
                              "model.block_size, or trainer.activation_checkpointing=true")
        log.warning("%s at micro-batch %d: going on with micro-batch %d, accumulating %d instead of %d per batch "
                    "of trainer.batch_size=%d (the global batch is unchanged)", why.capitalize(), self.size, smaller,
                    self.batch_size // smaller, self.batch_size // self.size, self.batch_size)
        self.size = smaller

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = []
        if self.size != self.batch_size:
            rows.append(("micro-batch", f"{self.size} sequences ({self.batch_size // self.size} per loaded batch)"))
        peak = peak_memory(self.device)
        if peak is not None:
            rows.append(("peak memory", f"{format_bytes(peak)} (torch.cuda.max_memory_allocated)"))
        return rows

    def fit(self, trial: Callable[[int], None]) -> None:
        """micro_batch_size=auto: the largest size, from batch_size down, for which `trial(size)` (a forward
        and backward of that many sequences) runs without an out-of-memory error."""
        self.size = self.batch_size
        while True:
            try:
                trial(self.size)
                break
            except torch.OutOfMemoryError:
                pass
            self._halve("a trial step at start-up ran out of memory")
        _free_cached_memory(self.device)
        if self.device.type == "cuda":  # the logged peak is the training's, not the search's
            torch.cuda.reset_peak_memory_stats(self.device)
        log.info("trainer.micro_batch_size=auto: micro-batch %d fits (accumulating %d per batch of %d)",
                 self.size, self.batch_size // self.size, self.batch_size)


def trial_step(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], model: torch.nn.Module,
               vocab_size: int, block_size: int, device: torch.device, autocast: Callable) -> Callable[[int], None]:
    """A forward and backward of `size` random sequences, gradients then dropped: what `fit` tries. Its
    random ids come from a generator of its own, so the run's random numbers are the same as without it.
    Compiled blocks run eagerly here: each size tried would otherwise be compiled, and the training graph
    would turn shape-generic; eager needs at least the memory compiled code does, so what fits stays fitting."""

    def trial(size: int) -> None:
        generator = torch.Generator(device).manual_seed(0)
        x = torch.randint(vocab_size, (size, block_size), device=device, generator=generator)  # (size, T)
        with torch.compiler.set_stance("force_eager"), autocast():
            loss = forward(x, x)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return trial


def micro_batches(setting: str | None, batch_size: int, device: torch.device,
                  trial: Callable[[int], None], world: World | None = None) -> MicroBatches:
    """The micro-batching trainer.micro_batch_size asks for; `auto` searches with `trial` on CUDA only."""
    size = configured_size(setting, batch_size)
    batcher = MicroBatches(batch_size, size or batch_size, device, world)
    if size is None and device.type == "cuda":
        batcher.fit(trial)
    elif size is None:
        log.info("trainer.micro_batch_size=auto: micro-batch %d (all of trainer.batch_size) on %s; the start-up "
                 "search runs on CUDA only, and a step that runs out of memory halves it", batch_size, device)
    return batcher


def peak_memory(device: torch.device) -> int | None:
    """Bytes the CUDA caching allocator has handed out at most since start (or the last reset); None off CUDA."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
