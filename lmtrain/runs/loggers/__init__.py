"""Where a run's records go besides metrics.jsonl: loss.png, TensorBoard, Weights & Biases.

metrics.jsonl stays the source of truth and is always written; MetricsLog hands each record it writes
to every RunLogger here, and closes them with itself. The trackers are imported and started before any data
is read (lmtrain.training.setup), so a broken install, a missing login or an unreachable server stops the run
at once with one line (exit 2); once training runs, a tracker that fails is switched off with a warning and
the run goes on.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from lmtrain.config.logger import PACKAGES, LoggerConfig
from lmtrain.errors import ConfigError, LmtrainError

log = logging.getLogger(__name__)
_open: list[RunLogger] = []  # this process's started loggers, until closed: a failed run closes them (close_open)

# metrics.jsonl key -> the name both trackers show it under; other numbers go under train/ or val/ by record
METRIC_NAMES = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                "tokens_per_s": "train/tokens_per_s", "mfu": "train/mfu", "val_loss": "val/loss", "val_ppl": "val/ppl",
                "epoch_avg_loss": "train/epoch_avg_loss"}

# What to do when a tracker cannot start, besides what its own error says.
_FIXES = {"wandb": "log in with `wandb login` (or set WANDB_API_KEY), or log offline with logger.wandb.mode=offline"}


def metric_name(key: str, record: dict) -> str:
    """The tracker name of a metrics.jsonl key: `train/loss`, `val/loss`, ..."""
    return METRIC_NAMES.get(key) or f"{'val' if 'val_loss' in record else 'train'}/{key}"


class RunLogger(Protocol):
    name: str  # as the user knows it, for warnings: "TensorBoard"

    def start(self, config: dict) -> None:
        """The run's config, resolved once the data and the model are built (its vocabulary size, ...)."""

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


def _started(name: str, make: Callable[[], RunLogger]) -> RunLogger:
    """A tracker, imported and started; any failure is one line naming `logger=name` and what to do."""
    module, pip = PACKAGES[name]
    try:
        importlib.import_module(module)
    except Exception as e:  # a broken install can raise anything while importing
        raise ConfigError(f"logger={name}: the {module} package is installed but fails to import "
                          f"({type(e).__name__}: {_first_line(e)}); reinstall it: {pip} --force-reinstall") from None
    try:
        return make()
    except (LmtrainError, OSError):  # already one line: a setting named, or a path that cannot be written
        raise
    except Exception as e:  # authentication, network, the tracker's own checks: each raises its own types
        fix = f"; {_FIXES[name]}" if name in _FIXES else ""
        raise ConfigError(f"logger={name} could not start: {type(e).__name__}: {_first_line(e)}{fix}") from None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else "no message"


def build_loggers(cfg: LoggerConfig, run_dir: Path, config: dict) -> list[RunLogger]:
    """The loss plot, always, and each tracker the `logger` group chose, started; `config` is the run config,
    whose `tags` both trackers show."""
    from lmtrain.runs.loggers.plot import LossPlot

    loggers: list[RunLogger] = [LossPlot(run_dir)]
    tags = list(config.get("tags") or [])
    try:
        if cfg.tensorboard is not None:
            from lmtrain.runs.loggers.tensorboard import TensorBoardLogger

            loggers.append(_started("tensorboard", lambda: TensorBoardLogger(run_dir / cfg.tensorboard.dir,
                                                                              run_overrides(run_dir), tags)))
        if cfg.wandb is not None:
            from lmtrain.runs.loggers.wandb import WandbLogger

            loggers.append(_started("wandb", lambda: WandbLogger(cfg.wandb, run_dir, config, sweep_group(), tags)))
    except BaseException:
        close_all(loggers)
        raise
    _open[:] = loggers
    return loggers


def call_guarded(loggers: list[RunLogger], call: Callable[[RunLogger], None]) -> None:
    """Call each logger; one that fails is switched off (removed from the list) with a warning: the run matters
    more than its dashboard, and metrics.jsonl keeps every record."""
    for logger in list(loggers):
        try:
            call(logger)
        except Exception as e:
            log.warning("%s failed (%s: %s); it is switched off for the rest of this run, which goes on "
                        "(metrics.jsonl keeps every record)", logger.name, type(e).__name__, _first_line(e))
            loggers.remove(logger)


def close_all(loggers: list[RunLogger]) -> None:
    closing = list(loggers)
    call_guarded(loggers, lambda logger: logger.close())
    _open[:] = [x for x in _open if x not in closing]


def close_open() -> None:
    """Close the loggers a run in this process started and has not closed: it failed before its end."""
    close_all(list(_open))
