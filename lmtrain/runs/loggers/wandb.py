"""Weights & Biases: the run's records as its history under TensorBoard's names (train/loss, val/loss, ...), the
config as its config, a sweep's jobs in one group, and one W&B run per run folder, continued on resume."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from lmtrain.config.logger import WANDB_MODES, WandbConfig
from lmtrain.errors import ConfigError
from lmtrain.files import write_text
from lmtrain.runs.loggers import metric_name
from lmtrain.runs.records import WANDB_RUN_ID, read_wandb_id

log = logging.getLogger(__name__)


def run_id(run_dir: Path) -> str:
    """The W&B run of this run folder: made at its first start, the same at every resume."""
    saved = read_wandb_id(run_dir)
    if saved is not None:
        return saved
    new = secrets.token_hex(6)  # W&B ids: lowercase letters and digits
    (Path(run_dir) / WANDB_RUN_ID).parent.mkdir(parents=True, exist_ok=True)
    write_text(Path(run_dir) / WANDB_RUN_ID, new + "\n")
    return new


class WandbLogger:
    name = "W&B"

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict, group: str | None, tags: list[str] | None = None):
        import wandb

        # A setting given in the config wins, then W&B's own environment variable, then lmtrain's default.
        mode = cfg.mode or os.environ.get("WANDB_MODE") or "offline"
        if mode not in (*WANDB_MODES, "dryrun", "run"):
            raise ConfigError(f"WANDB_MODE={mode!r} (from the environment) must be online, offline or disabled")
        tags = list(dict.fromkeys([*cfg.tags, *(tags or [])]))  # logger.wandb.tags and the run's own tags=[...]
        self.run = wandb.init(project=cfg.project or os.environ.get("WANDB_PROJECT") or "lmtrain", entity=cfg.entity,
                              mode=mode, group=cfg.group or os.environ.get("WANDB_RUN_GROUP") or group,
                              name=Path(run_dir).name, dir=str(run_dir), config=config, tags=tags or None,
                              id=run_id(run_dir), resume="allow")

    def start(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log(self, record: dict) -> None:
        values = {metric_name(k, record): v for k, v in record.items()
                  if k not in ("step", "samples") and isinstance(v, int | float) and not isinstance(v, bool)}
        if record.get("samples"):
            values["samples"] = "\n\n".join(record["samples"])
        if values:
            self.run.log(values, step=record["step"])

    def close(self) -> None:
        self.run.finish()
