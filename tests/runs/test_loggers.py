"""Trackers: started before any data work (a broken one stops the run in one line, exit 2), switched off with a
warning when they fail mid-run, and W&B continuing one run per folder, under TensorBoard's names."""

import importlib.util
import logging
import os

import pytest

from lmtrain.errors import ConfigError
from lmtrain.runs.metrics import MetricsLog
from lmtrain.runs.records import WANDB_RUN_ID, read_metrics

from conftest import FAST_TRAIN, TINY_MODEL, run_cli

SHORT = [*TINY_MODEL, *FAST_TRAIN, "trainer.eval_every=2", "trainer.sample_every=0"]


class Recorder:
    name = "recorder"

    def __init__(self, fail_at: int | None = None):
        self.records, self.fail_at, self.closed = [], fail_at, False

    def log(self, record):
        if record["step"] == self.fail_at:
            raise ConnectionError("the server went away")
        self.records.append(record["step"])

    def close(self):
        self.closed = True


def test_a_tracker_that_fails_mid_run_is_switched_off_and_the_run_goes_on(tmp_path, caplog):
    failing, healthy = Recorder(fail_at=2), Recorder()
    metrics = MetricsLog(tmp_path / "metrics.jsonl", loggers=[failing, healthy])
    with caplog.at_level(logging.WARNING):
        for step in (1, 2, 3):
            metrics.write({"step": step, "loss": 1.0})
        metrics.close()
    assert "recorder failed (ConnectionError: the server went away); it is switched off" in caplog.text
    assert failing.records == [1] and not failing.closed
    assert healthy.records == [1, 2, 3] and healthy.closed
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def no_data_work(out: str) -> bool:
    return "Tokeniz" not in out and "Using tokenized" not in out


@pytest.mark.slow
@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_a_broken_tracker_install_stops_the_run_in_one_line_before_any_data_work(tmp_path, package):
    fake = tmp_path / "fake" / package
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('a broken install: libfoo.so not found')\n")
    result = run_cli("train", *SHORT, "trainer.max_steps=2", f"logger={package}", cwd=tmp_path,
                     env={"PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")])})
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert (f"logger={package}: the {package} package is installed but fails to import (ImportError: a broken "
            f"install: libfoo.so not found); reinstall it: pip install 'lmtrain[{package}]' --force-reinstall") in out
    assert "Traceback" not in out and no_data_work(out), out
    assert not (tmp_path / "outputs").exists(), "the failed start left its folder"


needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="needs lmtrain[wandb]")


@pytest.mark.slow
@needs_wandb
def test_wandb_online_without_a_login_is_one_line_before_any_data_work(tmp_path):
    env = {"HOME": str(tmp_path), "WANDB_API_KEY": "", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}
    result = run_cli("train", *SHORT, "trainer.max_steps=2", "logger=wandb", "logger.wandb.mode=online",
                     cwd=tmp_path, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "logger=wandb could not start: UsageError: No API key configured" in out
    assert "log in with `wandb login` (or set WANDB_API_KEY), or log offline with logger.wandb.mode=offline" in out
    assert "Traceback" not in out and no_data_work(out), out


@pytest.mark.slow
@needs_wandb
def test_wandb_continues_one_run_per_folder_under_tensorboards_names(tmp_path):
    from test_sweep_cli import wandb_history

    run = tmp_path / "run"
    first = run_cli("train", *SHORT, "trainer.max_steps=2", "trainer.save_every=2", "logger=wandb",
                    f"hydra.run.dir={run}")
    assert first.returncode == 0, first.stdout + first.stderr
    run_id = (run / WANDB_RUN_ID).read_text().strip()
    resumed = run_cli("train", *SHORT, "trainer.max_steps=4", "trainer.resume=auto", "logger=wandb",
                      f"hydra.run.dir={run}")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)  # one W&B run, continued
    history = wandb_history(files[1])
    losses = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert {int(h["_step"]): h["train/loss"] for h in history if "train/loss" in h} == \
        pytest.approx({s: v for s, v in losses.items() if s > 2})
    assert any("val/loss" in h for h in history)


@needs_wandb
def test_wandb_settings_come_from_the_config_then_the_environment_then_lmtrains_defaults(tmp_path, monkeypatch):
    import wandb

    from lmtrain.config.logger import WandbConfig
    from lmtrain.runs.loggers.wandb import WandbLogger

    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs))
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(name, raising=False)
    WandbLogger(WandbConfig(), tmp_path, {}, group="multirun/x")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "theirs")
    WandbLogger(WandbConfig(), tmp_path, {}, group="multirun/x")
    WandbLogger(WandbConfig(mode="offline", project="mine", group="g"), tmp_path, {}, group="multirun/x")
    assert [(c["mode"], c["project"], c["group"]) for c in calls] == [
        ("offline", "lmtrain", "multirun/x"), ("disabled", "theirs", "multirun/x"), ("offline", "mine", "g")]
    assert len({c["id"] for c in calls}) == 1 and all(c["resume"] == "allow" for c in calls)  # one run per folder
    monkeypatch.setenv("WANDB_MODE", "onlin")
    with pytest.raises(ConfigError, match="WANDB_MODE='onlin' \\(from the environment\\) must be online, offline"):
        WandbLogger(WandbConfig(), tmp_path, {}, group=None)
