"""loss.png in the run folder, redrawn from metrics.jsonl at each evaluation and at the end."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


class LossPlot:
    name = "loss.png"

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.stale = False  # records arrived since the last drawing

    def start(self, config: dict) -> None:
        pass

    def log(self, record: dict) -> None:
        self.stale = True
        if "val_loss" in record:
            self.draw()

    def close(self) -> None:
        if self.stale:
            self.draw()

    def draw(self) -> None:
        from lmtrain.runs.sweeps.plots import plot_run
        from lmtrain.runs.sweeps.runs import read_run

        try:
            plot_run(read_run(self.run_dir), self.run_dir / "loss.png")
        except Exception as e:  # a plot must never stop training
            log.warning("Could not draw %s: %s", self.run_dir / "loss.png", e)
        self.stale = False
