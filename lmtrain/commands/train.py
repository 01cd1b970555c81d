"""`lmtrain train`: compose the config, check it, and train."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lmtrain.config import register_configs, to_train_config
from lmtrain.console import quiet_libraries
from lmtrain.errors import reports_user_errors
from lmtrain.run_dir import open_run_dir

register_configs()
log = logging.getLogger(__name__)

# Exit status after a Ctrl-C, as a shell reports a process ended by SIGINT; a clean stop on a signal
# exits with 128 + its number too (143 for SIGTERM), so `lmtrain train && next-step` never runs
# next-step on a half-trained model.
INTERRUPTED_EXIT = 130
_CONFIG_OPTIONS = ("--config-dir", "-cd", "--config-name", "-cn")


def resume_command(run_dir: Path) -> str:
    """The command that continues this run: its config options and overrides, plus resume=auto and its run dir."""
    argv, options = sys.argv[1:], []
    for i, arg in enumerate(argv):
        if arg in _CONFIG_OPTIONS and i + 1 < len(argv):
            options += [arg, argv[i + 1]]
        elif arg.startswith(tuple(f"{o}=" for o in _CONFIG_OPTIONS)):
            options.append(arg)
    overrides = [o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0].lstrip("+~") != "trainer.resume"]
    return shlex.join(["lmtrain", "train", *options, "trainer.resume=auto", f"hydra.run.dir={run_dir}", *overrides])


@hydra.main(version_base="1.3", config_path="pkg://lmtrain.configs", config_name="train")
@reports_user_errors
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with open_run_dir(run_dir) as run:  # a start that fails removes the folder it created
        train_cfg = to_train_config(cfg)  # every check runs here, before any data is touched
        run.claim(train_cfg.trainer.resume, train_cfg.trainer.overwrite)
        quiet_libraries()
        from lmtrain.trainer import Trainer  # imported late: --help and config errors stay fast

        try:
            result = Trainer(train_cfg, run_dir).fit()
        except KeyboardInterrupt:
            log.error("Interrupted. %s", _continue_hint(run_dir))
            sys.exit(INTERRUPTED_EXIT)
    if result.stopped_by is not None:
        log.info("%s", _continue_hint(run_dir))
        sys.exit(128 + result.stopped_by)
    return result.val_loss  # what a sweeper minimizes


def _continue_hint(run_dir: Path) -> str:
    """How to continue: only when a checkpoint exists to continue from."""
    if not (run_dir / "checkpoints" / "latest.json").is_file():
        return "No checkpoint was saved yet, so there is nothing to continue; start the run again."
    return f"Continue this run with:\n  {resume_command(run_dir)}"
