"""Sweep pieces without training: run folders read back, the summary, names, plots, statuses, the error boundary."""

import csv
import json
import signal

import pytest
from hydra import compose, initialize_config_module
from rich.console import Console

from lmtrain.commands.plot import plot_command
from lmtrain.commands.summarize import summarize_command
from lmtrain.config import register_configs, to_train_config
from lmtrain.config.logger import LoggerConfig, WandbConfig, validate_logger
from lmtrain.errors import ConfigError, JobFailed, RunStopped, reports_user_errors
from lmtrain.runs.sweeps import status as status_module
from lmtrain.runs.sweeps.jobs import job_folder_name
from lmtrain.runs.sweeps.report import read_runs
from lmtrain.runs.sweeps.runs import objective_value
from lmtrain.runs.sweeps.status import read_status, recorded_status
from lmtrain.runs.sweeps.summary import rows, sort_runs, to_table

register_configs()


def make_run(folder, overrides, status, val_losses=(), elapsed=None):
    """A run folder as lmtrain leaves one: overrides.yaml, status.json and metrics.jsonl (2 train steps per eval)."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra/overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / "status.json").write_text(json.dumps(status))
    records, step = [], 0
    for val in val_losses:
        for _ in range(2):
            step += 1
            records.append({"step": step, "loss": val + 0.5, "lr": 1e-3, "tokens": step * 128,
                            "tokens_per_s": 1000.0 * step, "elapsed_s": (elapsed or {}).get(step, step * 0.5)})
        records.append({"step": step, "val_loss": val, "elapsed_s": (elapsed or {}).get(step, step * 0.5)})
    if records:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep=[/x]"
    make_run(root / "0_optimizer.lr=1e-3", ["optimizer.lr=1e-3", "trainer.max_steps=4", "trainer.resume=auto"],
             {"job": 0, "status": "completed"}, [3.0, 2.0])
    make_run(root / "1_optimizer.lr=[bold]", ["optimizer.lr=[bold]", "trainer.max_steps=4"],
             {"job": 1, "status": "failed", "error": "optimizer.lr=[bold]: could not be converted to Float"})
    # Resumed after step 2: its clock restarts, so the wall time is the sum of both segments (1.0 + 3.0).
    make_run(root / "2_optimizer.lr=3e-4", ["optimizer.lr=3e-4", "trainer.max_steps=4"],
             {"job": 2, "status": "completed"}, [2.5, 1.5], elapsed={1: 0.5, 2: 1.0, 3: 0.5, 4: 3.0})
    (root / "multirun.yaml").write_text("{}\n")
    return root


def test_runs_are_read_from_their_folders_and_ranked_best_first(sweep):
    runs = sort_runs(read_runs([sweep]), "val_loss")
    assert [r.job for r in runs] == [2, 0, 1]  # best validation loss first, the failed job last
    best = runs[0]
    assert (best.val_loss, best.best_val_loss, best.best_step, best.train_loss) == (1.5, 1.5, 4, 2.0)
    assert (best.steps, best.tokens, best.wall_s, best.tokens_per_s) == (4, 512, 4.0, 2500.0)
    assert best.overrides == {"optimizer.lr": "3e-4", "trainer.max_steps": "4"}  # trainer.resume: not a choice
    assert runs[2].status == "failed" and "could not be converted" in runs[2].error
    header, body = rows(runs, sweep, exact=True)
    assert header[:3] == ["job", "run", "optimizer.lr"]  # only what varies between the runs
    assert body[0][:3] == ["2", "2_optimizer.lr=3e-4", "3e-4"]
    assert [r.job for r in sort_runs(runs, "optimizer.lr")] == [2, 0, 1]  # by a swept value: numbers, then text


def test_the_summary_table_shows_paths_and_values_as_plain_text(sweep):
    console = Console(record=True, width=300)
    console.print(to_table(*rows(read_runs([sweep]), sweep), "Sweep [/x] summary"))
    text = console.export_text()
    assert "optimizer.lr=[bold]: could not be converted to Float" in text and "Sweep [/x] summary" in text


def test_summarize_writes_csv_md_and_png_and_plot_draws_runs(sweep, tmp_path, capsys):
    summarize_command([str(sweep), "metric=best_val_loss"])
    with open(sweep / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["job"] for r in table] == ["2", "0", "1"]
    assert table[0]["wall_s"] == "4.0" and table[0]["best_val_loss"] == "1.5"
    assert "| 2 | 2_optimizer.lr=3e-4 | 3e-4 | completed |" in (sweep / "summary.md").read_text()
    assert (sweep / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert "3 jobs: 2 completed, 1 failed" in capsys.readouterr().out
    # Several folders together, sorted by another column, into a folder of their own.
    make_run(tmp_path / "by_hand", ["optimizer.lr=1e-2"], {"status": "completed"}, [1.0])
    summarize_command([str(sweep), str(tmp_path / "by_hand"), "sort=job", f"out={tmp_path / 'all'}"])
    with open(tmp_path / "all/summary.csv", newline="") as f:
        assert [r["optimizer.lr"] for r in csv.DictReader(f)] == ["1e-3", "[bold]", "3e-4", "1e-2"]
    with pytest.raises(SystemExit) as stop:
        summarize_command([str(sweep), "colour=red"])
    assert stop.value.code == 2
    assert plot_command([str(sweep / "0_optimizer.lr=1e-3")]).name == "loss.png"
    assert plot_command([str(sweep), str(tmp_path / "by_hand"), f"out={tmp_path / 'runs.png'}"]).is_file()


def test_objective_comes_from_metrics():
    records = [{"step": 1, "val_loss": 2.0}, {"step": 2, "val_loss": 1.0}, {"step": 3, "val_loss": 1.5}]
    assert objective_value(records, "val_loss") == 1.5
    assert objective_value(records, "best_val_loss") == 1.0
    assert objective_value([{"step": 1, "val_loss": float("nan")}], "val_loss") is None  # never a score


def test_job_folder_names_are_safe_file_names_and_stay_unique():
    assert job_folder_name(3, ["optimizer.lr=1e-3", "trainer.resume=auto"], ["trainer.resume"]) == \
        "3_optimizer.lr=1e-3"
    assert job_folder_name(0, ["data.train_files=[/a/b.txt]", "model=gpt_small"], []) == "0_model=gpt_small"
    assert job_folder_name(1, ["trainer.sample_prompts=['a b']"], []) == "1_trainer.sample_prompts=_a_b"
    assert job_folder_name(2, [], []) == "2"
    long_a, long_b = job_folder_name(0, ["x=" + "a" * 300], []), job_folder_name(0, ["x=" + "a" * 299 + "b"], [])
    assert len(long_a) < 200 and long_a != long_b


def test_status_records_how_a_job_ended_and_a_stop_ends_the_sequential_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(status_module, "_sweep_stopped_by", None)
    with recorded_status(tmp_path, 0) as job:
        assert read_status(tmp_path) == {"job": 0, "status": "running"}
        job.facts.update(objective="val_loss", value=1.25)
    assert read_status(tmp_path) == {"job": 0, "status": "completed", "objective": "val_loss", "value": 1.25}
    with pytest.raises(ConfigError), recorded_status(tmp_path, 0) as job:
        assert job.previous["status"] == "completed"
        raise ConfigError("trainer.batch_size=0 must be > 0")
    assert read_status(tmp_path)["error"] == "trainer.batch_size=0 must be > 0"
    with pytest.raises(RunStopped), recorded_status(tmp_path, 0):
        raise RunStopped(signal.SIGTERM, "stopped")
    assert read_status(tmp_path)["signal"] == "SIGTERM"
    (tmp_path / "next").mkdir()
    with pytest.raises(RunStopped, match="Not started"), recorded_status(tmp_path / "next", 1):
        pass
    assert read_status(tmp_path / "next")["status"] == "stopped"


def test_the_boundary_exits_for_a_single_run_and_raises_to_hydra_under_multirun(monkeypatch):
    @reports_user_errors
    def stopped():
        raise RunStopped(signal.SIGTERM, "Stopped by SIGTERM")

    monkeypatch.setattr("lmtrain.errors.in_multirun", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        stopped()
    assert exit_.value.code == 143
    monkeypatch.setattr("lmtrain.errors.in_multirun", lambda: True)
    with pytest.raises(JobFailed, match="stopped: Stopped by SIGTERM"):
        stopped()


def test_logger_group_takes_several_and_a_missing_package_names_its_pip_command(monkeypatch):
    with initialize_config_module("lmtrain.configs", version_base="1.3"):
        cfg = compose("train", overrides=["logger=[tensorboard,wandb]"])
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    loggers = to_train_config(cfg).logger
    assert loggers.tensorboard.dir == "tensorboard" and loggers.wandb.mode is None  # null: $WANDB_MODE, else offline
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"logger=wandb needs the wandb package.*pip install 'lmtrain\[wandb\]'"):
        validate_logger(LoggerConfig(wandb=WandbConfig()))
