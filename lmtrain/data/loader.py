"""Batches of (input, target) windows from token shards, with an exact, resumable position.

A split's shards are cut into non-overlapping blocks; a training window is a block plus the next token
(block_size + 1 tokens), and `shift` turns windows into inputs and targets. Each epoch visits every
block once in an order drawn from (seed, epoch), so the position (epoch, batch) fully determines what
comes next: it is all the state a resume needs. A mixture draws each sequence's source by weight with
an RNG keyed by (seed, batch), and walks each source's blocks the same way, epoch after epoch; its
position is the batch count plus the sequences taken from each source.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lmtrain.errors import DataError

if TYPE_CHECKING:
    from lmtrain.data.prepare import PreparedData


def shift(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token prediction's one shift: input = window[:-1], target = window[1:] (along the last dim).

    Both are contiguous copies, not views: pinning keeps a tensor's strides, and a non-contiguous pinned
    tensor copies to the GPU through a pageable temporary, so `non_blocking=True` would not overlap."""
    return windows[..., :-1].contiguous(), windows[..., 1:].contiguous()


class Blocks:
    """Every full window of a split: block_size + 1 tokens starting every block_size tokens, never across shards."""

    def __init__(self, shards: Sequence[np.ndarray], block_size: int, split: str):
        self.shards, self.block_size = list(shards), block_size
        counts = [max(0, (len(s) - 1) // block_size) for s in self.shards]
        self.first = np.cumsum([0] + counts)  # global index of each shard's first block; last entry: the total
        if self.first[-1] < 1:
            n = sum(len(s) for s in self.shards)
            raise DataError(f"the {split} split has {n:,} tokens, fewer than one window of "
                            f"model.block_size+1={block_size + 1}; use more text or a smaller model.block_size")

    def __len__(self) -> int:
        return int(self.first[-1])

    def __getstate__(self) -> dict:
        """Memory-mapped shards travel to worker processes as (file, dtype, offset, length), not as data."""
        state = dict(self.__dict__)
        state["shards"] = [(s.filename, s.dtype.str, s.offset, len(s)) if isinstance(s, np.memmap) else s
                           for s in self.shards]
        return state

    def __setstate__(self, state: dict) -> None:
        state["shards"] = [np.memmap(s[0], dtype=s[1], mode="r", offset=s[2], shape=(s[3],)) if isinstance(s, tuple)
                           else s for s in state["shards"]]
        self.__dict__.update(state)

    def windows(self, blocks: np.ndarray) -> torch.Tensor:
        """The windows of these block indices, as int64: (len(blocks), block_size + 1)."""
        shard = np.searchsorted(self.first, blocks, side="right") - 1
        start = (blocks - self.first[shard]) * self.block_size
        out = np.empty((len(blocks), self.block_size + 1), dtype=np.int64)
        for row, (s, o) in enumerate(zip(shard, start, strict=True)):
            out[row] = self.shards[s][o:o + self.block_size + 1]
        return torch.from_numpy(out)


class EpochBatches(Dataset):
    """Batch i of one epoch: `batch_size` windows in the epoch's order, as (input, target) int64 tensors."""

    def __init__(self, blocks: Blocks, order: np.ndarray, batch_size: int, rows: slice = slice(None)):
        self.blocks, self.order, self.batch_size, self.rows = blocks, order, batch_size, rows

    def __len__(self) -> int:
        return len(self.order) // self.batch_size  # the incomplete last batch is dropped

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch i, or only this rank's `rows` of it in a distributed run."""
        return shift(self.blocks.windows(self.order[i * self.batch_size:(i + 1) * self.batch_size][self.rows]))


def permutation(n: int, *key: int) -> np.ndarray:
    """A seeded order of n blocks, in the smallest index type that holds them."""
    order = np.random.default_rng(list(key)).permutation(n)
    return order.astype(np.uint32) if n <= np.iinfo(np.uint32).max else order


def _leave_stopping_to_main(worker_id: int) -> None:
    """Workers ignore Ctrl-C and SIGTERM, which reach the whole process group or SLURM job: the main
    process finishes its step, saves, and shuts the workers down itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # a preemption notice, too
    signal.set_wakeup_fd(-1)  # the main process's acknowledgment pipe is not ours to write to


def _batch_loader(batches: Dataset, indices: Iterable, seed: int, num_workers: int, pin_memory: bool) -> DataLoader:
    """Whole batches `batches[i]` for i in `indices`, loaded in worker processes when num_workers > 0."""
    # A generator of its own: DataLoader otherwise draws its worker seed from torch's global RNG,
    # which would shift dropout's random numbers on a resume that restarts the iteration.
    return DataLoader(batches, batch_size=None, sampler=indices, num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=_leave_stopping_to_main if num_workers else None)


@dataclass
class LoaderState:
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches already taken from the current epoch


class TrainLoader:
    """Endless training batches from one source, epoch after epoch, from a resumable position.

    In a distributed run, batch_size is the global batch and each rank takes only its `rows` of every
    batch: the position stays global, so any number of ranks sees the same sequences step by step.
    """

    def __init__(self, shards: Sequence[np.ndarray], block_size: int, batch_size: int, seed: int,
                 num_workers: int = 0, pin_memory: bool = False, rows: slice = slice(None), repeat: int = 0):
        self.blocks, self.batch_size, self.rows = Blocks(shards, block_size, "train"), batch_size, rows
        self.seed, self.num_workers, self.pin_memory = seed, num_workers, pin_memory
        self.repeat = repeat  # > 0: every epoch is the same first `repeat` batches (trainer.overfit_batches)
        if len(self.blocks) < batch_size:
            raise DataError(f"the train split has {len(self.blocks):,} windows of model.block_size={block_size}, "
                            f"fewer than trainer.batch_size={batch_size}")
        self.state = LoaderState()

    @property
    def batches_per_epoch(self) -> int:
        return min(self.repeat, len(self.blocks) // self.batch_size) or len(self.blocks) // self.batch_size

    @property
    def completed_epochs(self) -> int:
        """Epochs fully handed out; an epoch whose last batch was just taken counts as complete."""
        return self.state.epoch + (self.state.batch >= self.batches_per_epoch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self.repeat:  # the first epoch's first batches, again and again
            return permutation(len(self.blocks), self.seed, 0)[:self.batches_per_epoch * self.batch_size]
        return permutation(len(self.blocks), self.seed, epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batches forever, advancing `state` as each is handed out."""
        while True:
            batches = EpochBatches(self.blocks, self.epoch_order(self.state.epoch), self.batch_size, self.rows)
            remaining = range(self.state.batch, len(batches))
            for batch in _batch_loader(batches, remaining, self.seed, self.num_workers, self.pin_memory):
                self.state.batch += 1
                yield batch
            self.state = LoaderState(epoch=self.state.epoch + 1, batch=0)

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "batch": self.state.batch}

    def load_state_dict(self, state: dict) -> None:
        self.state = LoaderState(epoch=int(state["epoch"]), batch=int(state["batch"]))

    def summary_rows(self) -> list[tuple[str, str]]:
        return []  # one source: the trainer's own token count says it all


class _MixtureBatches(Dataset):
    """A batch from its plan: one (source, block) pair per row."""

    def __init__(self, blocks: list[Blocks]):
        self.blocks = blocks

    def __getitem__(self, plan: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        windows = torch.empty((len(plan), self.blocks[0].block_size + 1), dtype=torch.int64)
        for s, blocks in enumerate(self.blocks):
            rows = np.flatnonzero(plan[:, 0] == s)
            if len(rows):
                windows[torch.from_numpy(rows)] = blocks.windows(plan[rows, 1])
        return shift(windows)


class MixtureLoader:
    """Endless training batches from several sources; each sequence's source is drawn by weight.

    The same interface as TrainLoader. An epoch is as many sequences as all sources hold blocks; within
    it a small source repeats and a large one is partly seen, as the weights say. Each source walks its
    own blocks in seeded epochs, so none repeats a block before it has shown all of them.
    """

    def __init__(self, sources: dict[str, Sequence[np.ndarray]], weights: dict[str, float], block_size: int,
                 batch_size: int, seed: int, num_workers: int = 0, pin_memory: bool = False,
                 rows: slice = slice(None)):
        self.names, self.rows = list(sources), rows
        self.blocks = [Blocks(sources[name], block_size, f"train split of {name!r}") for name in self.names]
        self.weights = np.array([weights[name] for name in self.names])
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.batches_per_epoch = max(1, sum(len(b) for b in self.blocks) // batch_size)
        self.batch, self.drawn = 0, [0] * len(self.names)  # the position: batches taken, sequences per source

    @property
    def state(self) -> LoaderState:
        return LoaderState(epoch=self.batch // self.batches_per_epoch, batch=self.batch % self.batches_per_epoch)

    @property
    def completed_epochs(self) -> int:
        return self.batch // self.batches_per_epoch

    def sources_of(self, batch: int) -> np.ndarray:
        """The source of each sequence of a batch: a pure function of (seed, batch)."""
        return np.random.default_rng([self.seed, batch]).choice(len(self.names), size=self.batch_size, p=self.weights)

    def _plans(self, batch: int, drawn: list[int]) -> Iterator[np.ndarray]:
        """Each batch's (source, block) rows from a position on; runs ahead of training in a DataLoader."""
        drawn, orders = list(drawn), {}
        while True:
            plan = np.empty((self.batch_size, 2), dtype=np.int64)
            for row, s in enumerate(self.sources_of(batch)):
                n = len(self.blocks[s])
                epoch, k = divmod(drawn[s], n)
                if orders.get(s, (None,))[0] != epoch:
                    orders[s] = (epoch, permutation(n, self.seed, s, epoch))
                plan[row] = (s, orders[s][1][k])
                drawn[s] += 1
            yield plan
            batch += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plans = (plan[self.rows] for plan in self._plans(self.batch, self.drawn))  # this rank's rows only
        for batch in _batch_loader(_MixtureBatches(self.blocks), plans, self.seed, self.num_workers, self.pin_memory):
            counts = np.bincount(self.sources_of(self.batch), minlength=len(self.names))
            self.drawn = [d + int(c) for d, c in zip(self.drawn, counts, strict=True)]
            self.batch += 1
            yield batch

    def state_dict(self) -> dict:
        return {"batch": self.batch, "drawn": dict(zip(self.names, self.drawn, strict=True))}

    def load_state_dict(self, state: dict) -> None:
        self.batch, self.drawn = int(state["batch"]), [int(state["drawn"][name]) for name in self.names]

    def tokens_drawn(self) -> dict[str, int]:
        return {name: d * self.block_size for name, d in zip(self.names, self.drawn, strict=True)}

    def summary_rows(self) -> list[tuple[str, str]]:
        drawn = self.tokens_drawn()
        total = max(1, sum(drawn.values()))
        return [(f"tokens from {name}", f"{n:,} ({100 * n / total:.1f}%; weight {100 * w:.0f}%)")
                for (name, n), w in zip(drawn.items(), self.weights, strict=True)]


class JoinedBatches(Sequence):
    """Several batch sequences as one."""

    def __init__(self, parts: list[EpochBatches]):
        self.index = [(part, i) for part in parts for i in range(len(part))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        part, j = self.index[i]
        return part[j]


def eval_batches(shards: Sequence[np.ndarray], block_size: int, batch_size: int, n_batches: int,
                 split: str = "validation", rows: Callable[[int], slice] | None = None) -> EpochBatches:
    """The same validation batches at every evaluation: a fixed spread of windows over the whole split.
    rows(batch) picks this rank's rows of each batch in a distributed run."""
    blocks = Blocks(shards, block_size, split)
    n = min(len(blocks), batch_size * n_batches)
    order = np.random.default_rng(0).permutation(len(blocks))[:n]
    batch = min(batch_size, n)
    return EpochBatches(blocks, order, batch, rows(batch) if rows else slice(None))


def train_loader(data: PreparedData, block_size: int, batch_size: int, seed: int, num_workers: int = 0,
                 pin_memory: bool = False, rows: slice = slice(None), repeat: int = 0) -> TrainLoader | MixtureLoader:
    """The training batches of prepared data: a plain loader for one source, a mixture loader for several.
    batch_size counts the whole (global) batch; `rows` picks the part of each batch this rank trains on;
    repeat > 0 trains on that many batches only, over and over (one source only)."""
    if data.weights is None:
        (cache,) = data.caches.values()
        return TrainLoader(cache.shards("train"), block_size, batch_size, seed, num_workers, pin_memory, rows, repeat)
    return MixtureLoader({name: c.shards("train") for name, c in data.caches.items()}, data.weights, block_size,
                         batch_size, seed, num_workers, pin_memory, rows)


def val_batches(data: PreparedData, block_size: int, batch_size: int, n_batches: int,
                rows: Callable[[int], slice] | None = None) -> Sequence:
    """Validation batches. A mixture's are split between its sources by weight (at least one each), so
    the mean loss over them is the mixture's validation loss, weighted as training samples the sources.
    batch_size is global; rows(batch) gives this rank's part of a batch of that many sequences."""
    if data.weights is None:
        (cache,) = data.caches.values()
        return eval_batches(cache.shards("val"), block_size, batch_size, n_batches, rows=rows)
    return JoinedBatches([eval_batches(data.caches[name].shards("val"), block_size, batch_size,
                                       max(1, round(w * n_batches)), f"validation split of {name!r}", rows)
                          for name, w in data.weights.items()])
