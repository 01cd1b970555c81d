"""Batches of (input, target) windows from a flat token array, with an exact, resumable position.

The token array is cut into non-overlapping blocks; a training window is a block plus the next token
(block_size + 1 tokens), and `shift` turns windows into inputs and targets. Each epoch visits every
block once in an order drawn from (seed, epoch), so the position (epoch, batch) fully determines what
comes next: it is all the state a resume needs.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lmtrain.errors import DataError


def shift(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token prediction's one shift: input = window[:-1], target = window[1:] (along the last dim)."""
    return windows[..., :-1], windows[..., 1:]


def block_starts(n_tokens: int, block_size: int, split: str) -> np.ndarray:
    """Start offsets of every full window (block_size + 1 tokens) in a split of n_tokens."""
    n_blocks = (n_tokens - 1) // block_size
    if n_blocks < 1:
        raise DataError(f"the {split} split has {n_tokens:,} tokens, fewer than one window of "
                        f"model.block_size+1={block_size + 1}; use more text or a smaller model.block_size")
    return np.arange(n_blocks, dtype=np.int64) * block_size


class EpochBatches(Dataset):
    """Batch i of one epoch: `batch_size` windows in the epoch's order, as (input, target) int64 tensors."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, order: np.ndarray, block_size: int, batch_size: int):
        self.tokens, self.starts, self.order = tokens, starts, order
        self.block_size, self.batch_size = block_size, batch_size

    def __len__(self) -> int:
        return len(self.order) // self.batch_size  # the incomplete last batch is dropped

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        picks = self.starts[self.order[i * self.batch_size:(i + 1) * self.batch_size]]
        offsets = picks[:, None] + np.arange(self.block_size + 1)  # (B, T+1)
        windows = torch.from_numpy(self.tokens[offsets].astype(np.int64))
        return shift(windows)


def _leave_stopping_to_main(worker_id: int) -> None:
    """Workers ignore Ctrl-C and SIGTERM, which reach the whole process group or SLURM job: the main
    process finishes its step, saves, and shuts the workers down itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@dataclass
class LoaderState:
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches already taken from the current epoch


class TrainLoader:
    """Endless training batches, epoch after epoch, from a resumable position."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 num_workers: int = 0, pin_memory: bool = False):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.num_workers, self.pin_memory = seed, num_workers, pin_memory
        self.starts = block_starts(len(tokens), block_size, "train")
        if len(self.starts) < batch_size:
            raise DataError(f"the train split has {len(self.starts):,} windows of model.block_size={block_size}, "
                            f"fewer than trainer.batch_size={batch_size}")
        self.state = LoaderState()

    @property
    def batches_per_epoch(self) -> int:
        return len(self.starts) // self.batch_size

    @property
    def completed_epochs(self) -> int:
        """Epochs fully handed out; an epoch whose last batch was just taken counts as complete."""
        return self.state.epoch + (self.state.batch >= self.batches_per_epoch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.starts))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batches forever, advancing `state` as each is handed out."""
        while True:
            batches = EpochBatches(self.tokens, self.starts, self.epoch_order(self.state.epoch),
                                   self.block_size, self.batch_size)
            remaining = range(self.state.batch, len(batches))
            # A generator of its own: DataLoader otherwise draws its worker seed from torch's global RNG,
            # which would shift dropout's random numbers on a resume that restarts the iteration.
            loader = DataLoader(batches, batch_size=None, sampler=remaining, num_workers=self.num_workers,
                                pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(self.seed),
                                worker_init_fn=_leave_stopping_to_main if self.num_workers else None)
            for batch in loader:
                self.state.batch += 1
                yield batch
            self.state = LoaderState(epoch=self.state.epoch + 1, batch=0)

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "batch": self.state.batch}

    def load_state_dict(self, state: dict) -> None:
        self.state = LoaderState(epoch=int(state["epoch"]), batch=int(state["batch"]))


def eval_batches(tokens: np.ndarray, block_size: int, batch_size: int, n_batches: int) -> EpochBatches:
    """The same validation batches at every evaluation: a fixed spread of windows over the whole split."""
    starts = block_starts(len(tokens), block_size, "validation")
    n = min(len(starts), batch_size * n_batches)
    order = np.random.default_rng(0).permutation(len(starts))[:n]
    return EpochBatches(tokens, starts, order, block_size, min(batch_size, n))
