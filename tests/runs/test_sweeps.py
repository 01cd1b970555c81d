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
from lmtrain.runs.records import read_launched, read_status
from lmtrain.runs.sweeps import status as status_module
from lmtrain.runs.sweeps.jobs import job_folder_name
from lmtrain.runs.sweeps.report import read_runs
from lmtrain.runs.sweeps.runs import objective_value
from lmtrain.runs.sweeps.status import forget_launched, recorded_status
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
    summarize_command([str(sweep)])
    with open(sweep / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["job"] for r in table] == ["2", "0", "1"]
    assert table[0]["wall_s"] == "4.0" and table[0]["best_val_loss"] == "1.5"
    assert "| 2 | 2_optimizer.lr=3e-4 | 3e-4 | completed |" in (sweep / "summary.md").read_text()
    assert (sweep / "summary.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "3 jobs: 2 completed, 1 failed" in out
    assert "  job 1: failed: optimizer.lr=[bold]: could not be converted to Float" in out
    # Ranked another way, into files of their own: the sweep's summary stays as it was.
    before = (sweep / "summary.csv").read_text()
    summarize_command([str(sweep), "metric=best_val_loss"])
    assert (sweep / "summary.csv").read_text() == before
    with open(sweep / "summary_by_best_val_loss.csv", newline="") as f:
        assert [r["job"] for r in csv.DictReader(f)] == ["2", "0", "1"]
    assert (sweep / "summary_by_best_val_loss.png").is_file()
    # Several folders together, sorted by another column, into a folder of their own.
    make_run(tmp_path / "by_hand", ["optimizer.lr=1e-2"], {"status": "completed"}, [1.0])
    summarize_command([str(sweep), str(tmp_path / "by_hand"), "sort=job", f"out={tmp_path / 'all'}"])
    with open(tmp_path / "all/summary_by_job.csv", newline="") as f:
        assert [r["optimizer.lr"] for r in csv.DictReader(f)] == ["1e-3", "[bold]", "3e-4", "1e-2"]
    with pytest.raises(SystemExit) as stop:
        summarize_command([str(sweep), "colour=red"])
    assert stop.value.code == 2
    assert plot_command([str(sweep / "0_optimizer.lr=1e-3")]).name == "loss.png"
    assert plot_command([str(sweep), str(tmp_path / "by_hand"), f"out={tmp_path / 'runs.png'}"]).is_file()


def test_summarize_over_run_folders_shows_each_folder_and_the_values_they_resolved(tmp_path, capsys):
    first = make_run(tmp_path / "outputs/2026-01-01/10-00-00", ["optimizer.lr=1e-3"], {"status": "completed"}, [2.0])
    second = make_run(tmp_path / "outputs/2026-01-01/11-00-00", ["model.n_layers=4"], {"status": "completed"}, [1.5])
    third = make_run(tmp_path / "outputs/2026-01-02/09-00-00", ["optimizer.lr=1e-3"], {"status": "completed"}, [1.7])
    for folder, lr, layers in [(first, 0.001, 2), (second, 0.002, 4), (third, 0.001, 2)]:
        (folder / ".hydra/config.yaml").write_text(f"optimizer:\n  lr: {lr}\nmodel:\n  n_layers: {layers}\n")
    summarize_command([str(tmp_path / "outputs"), f"out={tmp_path / 'compare'}"])
    out = capsys.readouterr().out
    # The runs have no job numbers: the table names their folders, and fills in what each did not override.
    for folder in ("2026-01-01/10-00-00", "2026-01-01/11-00-00", "2026-01-02/09-00-00"):
        assert folder in out
    with open(tmp_path / "compare/summary.csv", newline="") as f:
        table = {r["run"]: (r["optimizer.lr"], r["model.n_layers"]) for r in csv.DictReader(f)}
    assert list(table.values()) == [("0.002", "4"), ("1e-3", "2"), ("1e-3", "2")]  # best val_loss first


def test_long_values_are_rounded_in_tables_and_job_folder_names(tmp_path):
    make_run(tmp_path / "s/0", ["optimizer.lr=0.0012345678901234"], {"job": 0, "status": "completed"}, [2.0])
    make_run(tmp_path / "s/1", ["optimizer.lr=0.02345678901234"], {"job": 1, "status": "completed"}, [1.0])
    runs = read_runs([tmp_path / "s"])
    assert [b[2] for b in rows(runs)[1]] == ["0.001235", "0.02346"]
    assert [b[2] for b in rows(runs, exact=True)[1]] == ["0.0012345678901234", "0.02345678901234"]  # the csv
    assert job_folder_name(3, ["optimizer.lr=0.0012345678901234", "model=gpt_small"], []) == \
        "3_optimizer.lr=0.001235,model=gpt_small"


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
    job_dir, sweep_dir = tmp_path / "0_x=1", tmp_path
    job_dir.mkdir()
    (tmp_path / "1_x=2").mkdir()
    with recorded_status(job_dir, 0, sweep_dir) as job:
        assert read_status(job_dir) == {"job": 0, "status": "running"}  # a new folder says so at once
        job.claimed()
        job.facts.update(objective="val_loss", value=1.25)
    done = {"job": 0, "status": "completed", "objective": "val_loss", "value": 1.25}
    assert read_status(job_dir) == done
    assert read_launched(sweep_dir) == [{**done, "folder": "0_x=1"}]

    # A rerun refused before it holds the folder (it holds a run, or another process trains there): the folder's
    # record stays as it was; the sweep's record of its jobs says what happened this time.
    refused = "0_x=1 already holds a run (checkpoints or metrics); continue it with trainer.resume=auto"
    with pytest.raises(ConfigError), recorded_status(job_dir, 0, sweep_dir) as job:
        assert job.previous == done and read_status(job_dir) == done
        raise ConfigError(refused)
    assert read_status(job_dir) == done
    assert read_launched(sweep_dir) == [{"job": 0, "folder": "0_x=1", "status": "failed", "error": refused}]
    with pytest.raises(ConfigError), recorded_status(job_dir, 0, sweep_dir) as job:
        job.claimed()  # once it holds the folder, the record is its own
        raise ConfigError("trainer.batch_size=0 must be > 0")
    assert read_status(job_dir)["error"] == "trainer.batch_size=0 must be > 0"

    with pytest.raises(RunStopped), recorded_status(job_dir, 0, sweep_dir) as job:
        job.claimed()
        raise RunStopped(signal.SIGTERM, "stopped")
    assert read_status(job_dir)["signal"] == "SIGTERM"
    with pytest.raises(RunStopped, match="Not started"), recorded_status(tmp_path / "1_x=2", 1, sweep_dir):
        pass
    assert read_status(tmp_path / "1_x=2") == {"job": 1, "status": "not started", "signal": "SIGTERM",
                                               "message": "Not started: the sweep was stopped by SIGTERM"}
    assert [j["status"] for j in read_launched(sweep_dir)] == ["stopped", "not started"]
    forget_launched(sweep_dir)  # the next sweep command there
    assert read_launched(sweep_dir) == []


def test_the_boundary_exits_for_a_single_run_and_raises_to_hydra_under_multirun(monkeypatch):
    @reports_user_errors
    def stopped():
        raise RunStopped(signal.SIGTERM, "Stopped by SIGTERM")

    monkeypatch.setattr("lmtrain.errors.in_multirun", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        stopped()
    assert exit_.value.code == 143
    monkeypatch.setattr("lmtrain.errors.in_multirun", lambda: True)
    monkeypatch.setattr("lmtrain.errors.in_search", lambda: False)
    assert stopped() is None  # a grid's job ends: its status.json and the sweep's summary say how
    monkeypatch.setattr("lmtrain.errors.in_search", lambda: True)
    with pytest.raises(JobFailed, match="stopped: Stopped by SIGTERM"):  # a search counts it as a failed trial
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


def test_summary_png_takes_its_axes_from_completed_jobs_and_draws_a_panel_per_parameter(tmp_path, monkeypatch):
    from lmtrain.runs.sweeps import plots

    root = tmp_path / "s"
    for job, (lr, layers, losses, status) in enumerate([("1e-3", "2", [3.0, 2.0], "completed"),
                                                        ("1e-2", "4", [2.5, 1.5], "completed"),
                                                        ("3e-3", "2", [2.8, 1.8], "completed"),
                                                        ("1e9", "4", [1e9], "failed")]):
        make_run(root / f"{job}_x", [f"optimizer.lr={lr}", f"model.n_layers={layers}"], {"job": job, "status": status},
                 losses)
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    runs = read_runs([root])
    plots.plot_runs(runs, ["optimizer.lr", "model.n_layers"], "val_loss", tmp_path / "summary.png")
    curves, lr, layers = [ax for ax in figures[0].axes if ax.get_visible()]  # one panel per swept parameter
    assert lr.get_xscale() == "log" and lr.get_xlim()[1] < 1  # the failed lr=1e9 does not stretch the axis
    assert lr.get_xlabel() == "optimizer.lr" and layers.get_xlabel() == "model.n_layers"
    assert [t.get_text() for t in lr.get_xticklabels()] == ["1e-3", "3e-3", "1e-2"]
    edge = [a.get_text() for a in lr.texts if a.get_color() == "tab:red"]
    assert edge == ["1e9"]  # marked at the edge, with its value
    assert curves.get_ylim()[1] < 10  # the failed job's 1e9 loss runs off the curves' axis
    assert "red: not completed" in lr.get_title()

