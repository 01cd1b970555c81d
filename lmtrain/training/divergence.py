"""Never train on NaN: catch a non-finite loss or gradient norm, roll back to the newest finite checkpoint.

The loop hands every step's loss and gradient norm to `DivergenceGuard.observe`, which notes the first
non-finite one on the device, without waiting for the GPU. Before anything reads or writes the weights
(a log line, an evaluation, a save, a sample, the end) the loop asks `found()`, which does sync. A
divergence is then either a stop (`trainer.on_divergence=stop`) or a rollback: the newest checkpoint
whose weights are all finite is restored, the batches from it up to the diverged step are skipped (so
the same data does not diverge the same way again), and the learning rate is scaled by
`trainer.rollback_lr_scale`. After `trainer.max_rollbacks` rollbacks the run stops with exit code 3 and
a message naming the step. Saves refuse non-finite weights (lmtrain.runs.checkpoint), so every checkpoint
on disk, best/ and final/ included, stays a usable model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from lmtrain.config import DivergenceAction, TrainerConfig
from lmtrain.distributed import collectives, strategies
from lmtrain.errors import CheckpointError, Diverged
from lmtrain.model.weights import nonfinite_names
from lmtrain.runs.records import step_candidates
from lmtrain.training.state import TrainingCheckpoint

log = logging.getLogger(__name__)


class DivergenceGuard:
    def __init__(self, cfg: TrainerConfig, device: torch.device, loss_scaling: bool = False):
        # fp16's GradScaler skips a step whose gradients overflowed (and lowers its scale): an inf gradient norm
        # is then routine, and only a non-finite loss is a divergence
        self.loss_scaling = loss_scaling
        self.action, self.max_rollbacks, self.lr_scale = cfg.on_divergence, cfg.max_rollbacks, cfg.rollback_lr_scale
        self.grad_accum_steps = cfg.grad_accum_steps
        self.rollbacks, self.lr_factor = 0, 1.0  # carried in the training state: a resume keeps them
        self._device = device
        self._reset()

    def _reset(self) -> None:
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self._device)  # step, or -1: none yet
        self._bad_values = torch.zeros(2, device=self._device)  # (loss, grad norm) at that step

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """Note the step's loss (and gradient norm, when computed) on the device; no sync."""
        use_norm = grad_norm is not None and not self.loss_scaling
        norm = strategies.full_value(grad_norm) if use_norm else torch.zeros((), device=self._device)
        values = torch.stack([loss.float(), norm.float()])
        first = (self._first_bad < 0) & ~torch.isfinite(values).all()
        self._first_bad = torch.where(first, step, self._first_bad)
        self._bad_values = torch.where(first, values, self._bad_values)

    def found(self) -> int | None:
        """The first step with a non-finite loss or gradient norm since the last rollback, or None (syncs).
        Every rank gets the same answer (the earliest over the ranks), so all of them roll back together."""
        never = torch.iinfo(torch.long).max
        step = int(self._first_bad.item())
        step = collectives.smallest(step if step >= 0 else never, self._device)
        return step if step != never else None

    def describe(self) -> str:
        loss, norm = self._bad_values.tolist()
        return f"step {self.found()} (loss {loss:.4g}, gradient norm {norm:.4g})"

    def roll_back(self, checkpoints: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                  loader, sharded: bool = False, rank: int = 0) -> TrainingCheckpoint:
        """Restore the newest finite checkpoint and skip the batches up to the diverged step; or raise
        Diverged when on_divergence=stop, max_rollbacks is spent, or there is nothing to roll back to."""
        bad, what = self.found(), self.describe()
        advice = "lower optimizer.lr, raise scheduler.warmup_steps or set trainer.grad_clip"
        if self.action == DivergenceAction.stop:
            raise Diverged(f"Training diverged at {what} (trainer.on_divergence=stop); {advice}, then "
                                   "continue from the newest checkpoint with trainer.resume=auto")
        if self.rollbacks >= self.max_rollbacks:
            raise Diverged(f"Training diverged at {what} again after {self.rollbacks} rollbacks "
                                   f"(trainer.max_rollbacks={self.max_rollbacks}); {advice}, then continue from the "
                                   "newest checkpoint with trainer.resume=auto")
        checkpoint = newest_finite(checkpoints, rank)
        if checkpoint is None:
            raise Diverged(f"Training diverged at {what} before any checkpoint was saved, so there is "
                                   f"nothing to roll back to; {advice}, or save sooner (trainer.save_every)")
        checkpoint.apply(model, optimizer, loader, sharded, rank)
        skipped = (bad - checkpoint.state["step"]) * self.grad_accum_steps
        batches = iter(loader)
        for _ in range(skipped):  # the loader's position advances as each batch is handed out
            next(batches)
        self.rollbacks += 1
        self.lr_factor *= self.lr_scale
        log.warning("Training diverged at %s; rolled back to %s (rollback %d of at most %d), skipping %d batches, "
                    "learning rate x%.3g", what, checkpoint.folder, self.rollbacks, self.max_rollbacks, skipped,
                    self.lr_factor)
        self._reset()
        return checkpoint

    def state_dict(self) -> dict:
        return {"rollbacks": self.rollbacks, "lr_factor": self.lr_factor}

    def load_state_dict(self, state: dict) -> None:
        self.rollbacks, self.lr_factor = state.get("rollbacks", 0), state.get("lr_factor", 1.0)


def newest_finite(root: Path, rank: int = 0) -> TrainingCheckpoint | None:
    """The newest step checkpoint under RUN/checkpoints that reads whole and whose weights are all finite.
    A sharded one (FSDP) is not read here: it was saved only after the divergence check, so it is finite."""
    for folder in step_candidates(root):
        try:
            checkpoint = TrainingCheckpoint.read(folder, rank)
        except CheckpointError as e:
            log.warning("Cannot roll back to %s: %s", folder.name, e)
            continue
        if checkpoint.weights is None or not nonfinite_names(checkpoint.weights):
            return checkpoint
        log.warning("Cannot roll back to %s: its weights are not finite", folder.name)
    return None
