"""tags=[...]: kept in the run's config, shown in its summary and a sweep's, given to TensorBoard and W&B."""

from __future__ import annotations

import csv
import importlib.util

import pytest
from omegaconf import OmegaConf

from lmtrain.config.logger import LoggerConfig, TensorBoardConfig, WandbConfig
from lmtrain.runs.loggers import build_loggers

from conftest import FAST_TRAIN, QUIET_TRAIN, TINY_MODEL, run_cli


def test_tags_reach_the_run_folder_and_the_summaries(tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", *TINY_MODEL, *FAST_TRAIN, *QUIET_TRAIN, "trainer.max_steps=2", "tags=[baseline,short]",
                     f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(OmegaConf.load(run / ".hydra" / "config.yaml").tags) == ["baseline", "short"]
    assert "tags" in result.stdout and "baseline, short" in result.stdout  # the training summary's row
    summary = run_cli("summarize", str(run), f"out={tmp_path / 'out'}", cwd=tmp_path)
    assert summary.returncode == 0, summary.stderr
    (row,) = csv.DictReader((tmp_path / "out" / "summary.csv").open())
    assert row["tags"] == "baseline, short"


def test_a_tag_longer_than_trackers_take_is_refused(tmp_path):
    result = run_cli("train", f"tags=[{'x' * 65}]", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2 and "must have 1 to 64 characters" in result.stdout + result.stderr


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None or importlib.util.find_spec("wandb") is None,
                    reason="needs lmtrain[tensorboard,wandb]")
def test_both_trackers_get_the_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = LoggerConfig(tensorboard=TensorBoardConfig(), wandb=WandbConfig(mode="offline", tags=["mine"]))
    _, tensorboard, wandb = build_loggers(cfg, tmp_path, {"tags": ["baseline", "short"]})
    assert list(wandb.run.tags) == ["mine", "baseline", "short"]
    for logger in (tensorboard, wandb):
        logger.log({"step": 1, "loss": 2.0, "val_loss": 2.5})
        logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    (text,) = events.Tensors("tags/text_summary")
    assert text.tensor_proto.string_val == [b"baseline, short"]
