"""`lmtrain train`: compose the config, check it, and train."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lmtrain.config import register_configs, to_train_config
from lmtrain.console import quiet_libraries
from lmtrain.errors import reports_user_errors

register_configs()


@hydra.main(version_base="1.3", config_path="pkg://lmtrain.configs", config_name="train")
@reports_user_errors
def main(cfg: DictConfig) -> float:
    train_cfg = to_train_config(cfg)  # every check runs here, before any data is touched
    quiet_libraries()
    from lmtrain.trainer import Trainer  # imported late: --help and config errors stay fast

    result = Trainer(train_cfg, Path(HydraConfig.get().runtime.output_dir)).fit()
    return result.val_loss  # what a sweeper minimizes
