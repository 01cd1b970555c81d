"""The Hydra callback that ends every `lmtrain train -m` sweep with its summary (configured in train.yaml).

Hydra calls on_multirun_end only when the sweeper returns. The basic sweeper raises the first failed job's
error once the whole batch has run, skipping on_multirun_end; `lmtrain train` then calls `finish_sweep`
as it unwinds, so every sweep leaves a summary, whichever way it ended.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lmtrain.runs.sweeps.report import read_runs, summarize

log = logging.getLogger(__name__)

_pending: SweepSummary | None = None  # a sweep that started and has no summary yet


class SweepSummary(Callback):
    def __init__(self, objective: str = "val_loss"):
        self.objective = objective
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        objective = config.get("trainer", {}).get("objective", self.objective)
        self.objective = getattr(objective, "value", objective)  # the schema makes it an Enum
        global _pending
        _pending = self

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._finish() > 0:
            raise SystemExit(1)  # any failed job makes the sweep fail (an Exception would only be a warning)

    def _finish(self) -> int:
        """Write and show the summary; returns how many jobs did not complete."""
        global _pending
        _pending = None
        if self.sweep_dir is None or not self.sweep_dir.is_dir():
            return 0
        runs = read_runs([self.sweep_dir])
        if not runs:
            return 0
        try:
            summarize(runs, self.sweep_dir, self.objective)
        except Exception:  # a summary must never hide how the sweep itself went
            log.exception("Could not write the sweep summary in %s", self.sweep_dir)
        unfinished = sum(r.status != "completed" for r in runs)
        if unfinished:
            log.error("%d of %d jobs did not complete; see status.json and train.log in their folders",
                      unfinished, len(runs))
        return unfinished


def finish_sweep() -> None:
    """Summarize a sweep that ended by an exception (Hydra skipped on_multirun_end); nothing otherwise."""
    if _pending is not None:
        _pending._finish()
