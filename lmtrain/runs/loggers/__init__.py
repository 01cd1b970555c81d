"""Where a run's records go besides metrics.jsonl: loss.png, TensorBoard, Weights & Biases.

metrics.jsonl stays the source of truth and is always written; MetricsLog hands each record it writes
to every RunLogger here, and closes them with itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from lmtrain.config.logger import LoggerConfig

log = logging.getLogger(__name__)


class RunLogger(Protocol):
    def log(self, record: dict) -> None:
        """One metrics.jsonl record: training (step, loss, lr, ...), evaluation (val_loss) or samples."""

    def close(self) -> None:
        """The run ended (completed or stopped): flush, write final figures."""


def run_overrides(run_dir: Path) -> dict[str, str]:
    """The run's command-line overrides: the hyperparameters a sweep's trackers compare jobs by."""
    from lmtrain.runs.sweeps.runs import read_overrides

    return read_overrides(run_dir)


def sweep_group() -> str | None:
    """A sweep's folder, which groups its jobs; None outside a multirun."""
    from lmtrain.errors import in_multirun

    if not in_multirun():
        return None
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().sweep.dir)


def build_loggers(cfg: LoggerConfig, run_dir: Path, config: dict) -> list[RunLogger]:
    """The loss plot, always, and each tracker the `logger` group chose; `config` is the resolved run config,
    whose `tags` both trackers show."""
    from lmtrain.runs.loggers.plot import LossPlot

    loggers: list[RunLogger] = [LossPlot(run_dir)]
    tags = list(config.get("tags") or [])
    if cfg.tensorboard is not None:
        from lmtrain.runs.loggers.tensorboard import TensorBoardLogger

        loggers.append(TensorBoardLogger(run_dir / cfg.tensorboard.dir, run_overrides(run_dir), tags))
    if cfg.wandb is not None:
        from lmtrain.runs.loggers.wandb import WandbLogger

        loggers.append(WandbLogger(cfg.wandb, run_dir, config, sweep_group(), tags))
    return loggers
