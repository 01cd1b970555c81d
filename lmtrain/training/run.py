"""Training in this process, start to end: assemble the parts, fit, and say how it ended in plain values
(which cross process boundaries when lmtrain.distributed.launch started this process as a worker)."""

from __future__ import annotations

from pathlib import Path

from lmtrain.config import TrainConfig
from lmtrain.distributed.launch import Outcome
from lmtrain.distributed.world import shutdown
from lmtrain.training.loop import Trainer
from lmtrain.training.setup import build_parts


def run_training(cfg: TrainConfig, run_dir: Path) -> Outcome:
    """Train in this process (one of several, or the only one)."""
    try:
        result = Trainer(build_parts(cfg, run_dir)).fit()
    except KeyboardInterrupt:
        return Outcome(interrupted=True)
    finally:
        shutdown()
    return Outcome(result.val_loss, result.best_val_loss, result.steps,
                   None if result.stopped_by is None else int(result.stopped_by))
