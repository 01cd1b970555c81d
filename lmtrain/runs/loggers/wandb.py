"""Weights & Biases: the run's records as its history, the config as its config, a sweep's jobs in one group."""

from __future__ import annotations

import logging
from pathlib import Path

from lmtrain.config.logger import WandbConfig

log = logging.getLogger(__name__)


class WandbLogger:
    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict, group: str | None, tags: list[str] | None = None):
        import wandb

        tags = list(dict.fromkeys([*cfg.tags, *(tags or [])]))  # logger.wandb.tags and the run's own tags=[...]
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, group=cfg.group or group,
                              name=Path(run_dir).name, dir=str(run_dir), config=config, tags=tags)

    def log(self, record: dict) -> None:
        values = {k: v for k, v in record.items() if k not in ("step", "samples") and isinstance(v, int | float)}
        if record.get("samples"):
            values["samples"] = "\n\n".join(record["samples"])
        if values:
            self.run.log(values, step=record["step"])

    def close(self) -> None:
        self.run.finish()
