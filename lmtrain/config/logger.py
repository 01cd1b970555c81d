"""The `logger` group: experiment trackers fed beside metrics.jsonl, several at once (`logger=[tensorboard,wandb]`)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from lmtrain.config.base import check


@dataclass
class TensorBoardConfig:
    dir: str = "tensorboard"  # event files' folder, relative to the run directory


@dataclass
class WandbConfig:
    # Unset (null) settings come from W&B's environment variables, else lmtrain's defaults
    project: str | None = None  # W&B project; null: $WANDB_PROJECT, else lmtrain
    entity: str | None = None  # W&B team or user; null: $WANDB_ENTITY, else your default
    mode: str | None = None  # online, offline (`wandb sync` uploads later), disabled; null: $WANDB_MODE, else offline
    group: str | None = None  # runs shown together; null: $WANDB_RUN_GROUP, else a sweep's folder groups its jobs
    tags: list[str] = field(default_factory=list)  # labels on the run


@dataclass
class LoggerConfig:
    tensorboard: TensorBoardConfig | None = None  # set by logger=tensorboard
    wandb: WandbConfig | None = None  # set by logger=wandb


WANDB_MODES = ("online", "offline", "disabled")

# logger -> (module it needs, the pip command that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "pip install 'lmtrain[tensorboard]'"),
            "wandb": ("wandb", "pip install 'lmtrain[wandb]'")}


def validate_logger(cfg: LoggerConfig) -> None:
    """A chosen logger whose package is missing fails here, at once (lmtrain.runs.loggers imports and starts it
    before any data is read)."""
    for name, (module, pip) in PACKAGES.items():
        if getattr(cfg, name) is not None:
            check(importlib.util.find_spec(module) is not None,
                  f"logger={name} needs the {module} package, which is not installed: {pip}")
    if cfg.wandb is not None:
        check(cfg.wandb.mode in (None, *WANDB_MODES),
              f"logger.wandb.mode={cfg.wandb.mode!r} must be online, offline or disabled")
