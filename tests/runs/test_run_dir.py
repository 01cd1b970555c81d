"""Run folders: a fresh run never replaces an earlier one, one process trains in a folder at a time, and a
failed start leaves no folder behind (but never removes one the user had)."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import pytest

from lmtrain.errors import ConfigError
from lmtrain.runs import run_dir
from lmtrain.runs.records import WANDB_RUN_ID
from lmtrain.runs.run_dir import LOCK, RunLock, note_existing, open_run_dir

from conftest import FAST_TRAIN, TINY_MODEL, read_until, run_cli, start


def hydra_scaffolding(folder: Path, log_text: str = "") -> Path:
    """What Hydra writes before lmtrain's code runs: .hydra/ and the log file."""
    (folder / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (folder / ".hydra" / name).write_text("{}")
    (folder / "train.log").write_text(log_text)
    return folder


def test_a_second_lock_names_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(ConfigError, match=r"is in use: PID \d+ on .* is training there now"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK).exists()

    (tmp_path / LOCK).write_text("PID 999999999 on elsewhere\n")  # left by a process killed with SIGKILL
    with caplog.at_level(logging.WARNING):
        lock = RunLock(tmp_path)
        lock.acquire()
    assert "left by PID 999999999 on elsewhere, which is no longer running" in caplog.text
    lock.release()


def test_deleting_the_lock_file_does_not_release_the_lock(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    (tmp_path / LOCK).unlink()  # a user tidying up, or a script cleaning dotfiles, while the run trains
    with pytest.raises(ConfigError, match="is in use: another process is training there now"):
        RunLock(tmp_path).acquire()
    (tmp_path / LOCK).write_text("PID 1 on somewhere\n")  # or a new lock file in its place
    with pytest.raises(ConfigError, match="is in use"):
        RunLock(tmp_path).acquire()
    first.release()
    second = RunLock(tmp_path)
    second.acquire()
    second.release()


@pytest.mark.slow
def test_a_second_run_is_refused_while_one_trains_even_after_its_lock_file_is_deleted(tmp_path):
    run = tmp_path / "run"
    first = start(*TINY_MODEL, *FAST_TRAIN, "trainer.max_steps=100000", "trainer.save_every=3",
                  "trainer.eval_every=1000", "trainer.sample_every=0", f"hydra.run.dir={run}")
    try:
        read_until(first, "Saved checkpoint")
        (run / LOCK).unlink()
        second = run_cli("train", *TINY_MODEL, *FAST_TRAIN, "trainer.max_steps=100000", "trainer.resume=auto",
                         f"hydra.run.dir={run}")
        out = second.stdout + second.stderr
        assert second.returncode == 2 and "is in use" in out and "Traceback" not in out, out
        read_until(first, "Saved checkpoint")  # the first run goes on saving, its folders untouched
    finally:
        first.send_signal(signal.SIGINT)
        rest = first.communicate(timeout=120)[0]
    assert first.returncode == 130, rest
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert (run / "checkpoints" / latest["folder"] / "trainer_state.json").is_file()


def test_a_fresh_start_refuses_a_folder_holding_a_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with open_run_dir(tmp_path) as run, pytest.raises(ConfigError, match="trainer.resume=auto.*trainer.overwrite"):
        run.claim(None, overwrite=False)
    with open_run_dir(tmp_path) as run:
        run.claim("auto", overwrite=False)  # continuing it is what the folder is for
    (tmp_path / "checkpoints" / "step_000002").mkdir(parents=True)
    (tmp_path / "wandb").mkdir()
    (tmp_path / WANDB_RUN_ID).write_text("abc123\n")
    with open_run_dir(tmp_path) as run:
        run.claim(None, overwrite=True)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / WANDB_RUN_ID).exists()  # the next run is a new W&B run


def test_a_failed_start_removes_only_a_folder_it_created(tmp_path, monkeypatch):
    monkeypatch.setattr(run_dir, "_EXISTED", set())
    monkeypatch.setattr(run_dir, "_NAMED", set())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()  # the user's empty folder, holding a run folder this start named and created
    note_existing([f"hydra.run.dir={tmp_path}/mine/run"])
    named_new = hydra_scaffolding(tmp_path / "mine" / "run")
    with pytest.raises(ConfigError), open_run_dir(named_new):
        raise ConfigError("a config mistake")
    assert not named_new.exists() and (tmp_path / "mine").is_dir()
    created = hydra_scaffolding(tmp_path / "outputs" / "2026-01-01" / "10-00-00")
    with pytest.raises(ConfigError), open_run_dir(created):
        (created / "train.log").write_text("ERROR: a config mistake\n")
        raise ConfigError("a config mistake")
    assert not (tmp_path / "outputs").exists()  # nor Hydra's outputs/DATE/ and outputs/, left empty

    logged_before = hydra_scaffolding(tmp_path / "earlier", log_text="an earlier start's log\n")
    named = tmp_path / "named"
    named.mkdir()
    note_existing([f"hydra.run.dir={named}"])  # the dispatcher saw it before Hydra created anything in it
    hydra_scaffolding(named)
    for folder in (logged_before, named):
        with pytest.raises(ConfigError), open_run_dir(folder):
            raise ConfigError("a config mistake")
        assert folder.is_dir()

    with_results = hydra_scaffolding(tmp_path / "trained")
    with pytest.raises(KeyboardInterrupt), open_run_dir(with_results):
        (with_results / "metrics.jsonl").write_text('{"step": 1}\n')
        raise KeyboardInterrupt
    assert (with_results / "metrics.jsonl").is_file()
    crashed = hydra_scaffolding(tmp_path / "outputs" / "2026-01-01" / "11-00-00")  # before its first log line
    with pytest.raises(RuntimeError), open_run_dir(crashed):
        (crashed / "metrics.jsonl").write_text("")  # opened just before the first step
        (crashed / "tensorboard").mkdir()
        (crashed / "train.log").write_text("Traceback ...\nRuntimeError: a crash at step 3\n")
        raise RuntimeError("a crash at step 3")
    assert "a crash at step 3" in (crashed / "train.log").read_text()  # the run that trained keeps its log
    trackers_only = hydra_scaffolding(tmp_path / "outputs" / "2026-01-01" / "12-00-00")
    with pytest.raises(ConfigError), open_run_dir(trackers_only):
        (trackers_only / "tensorboard").mkdir()  # started before the data, which then failed
        raise ConfigError("data.train_files: no file found")
    assert not trackers_only.exists()


def test_a_sweep_jobs_failed_start_keeps_its_folder(tmp_path):
    job = hydra_scaffolding(tmp_path / "multirun" / "0")
    with pytest.raises(ConfigError), open_run_dir(job, keep_on_failure=True):
        (job / "status.json").write_text('{"status": "failed"}')  # what the sweep summary reads
        raise ConfigError("a config mistake")
    assert (job / "status.json").is_file()


def test_only_rank_0_of_a_torchrun_start_locks_guards_and_cleans_up_the_shared_folder(tmp_path, monkeypatch):
    shared = hydra_scaffolding(tmp_path / "run")
    first = RunLock(shared)
    first.acquire()  # rank 0 of the same run
    (shared / "metrics.jsonl").write_text("")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError), open_run_dir(shared) as run:
        run.claim(None, overwrite=False)  # neither refused by rank 0's lock nor taking a second one
        raise ConfigError("a config mistake")
    assert shared.is_dir() and (shared / LOCK).is_file()
    first.release()


@pytest.mark.slow
def test_cli_failed_starts_leave_no_folder_and_finished_runs_are_not_replaced(tmp_path):
    bad = run_cli("train", *TINY_MODEL, "trainer.eval_every=0", cwd=tmp_path)
    assert bad.returncode == 2 and "trainer.eval_every=0 must be > 0" in bad.stdout + bad.stderr
    missing = run_cli("train", *TINY_MODEL, f"model.init_from={tmp_path}/nowhere", cwd=tmp_path)
    assert missing.returncode == 2
    assert not any((tmp_path / "outputs").glob("*/*")), "a failed start left a run folder"

    run = tmp_path / "run"
    first = run_cli("train", *TINY_MODEL, *FAST_TRAIN, "trainer.max_steps=2", f"hydra.run.dir={run}")
    assert first.returncode == 0, first.stderr
    final = (run / "checkpoints" / "final" / "model.safetensors").read_bytes()
    metrics = (run / "metrics.jsonl").read_text()
    again = run_cli("train", *TINY_MODEL, *FAST_TRAIN, "trainer.max_steps=1", f"hydra.run.dir={run}")
    output = again.stdout + again.stderr
    assert again.returncode == 2 and "already holds a run" in output and "Traceback" not in output
    assert (run / "checkpoints" / "final" / "model.safetensors").read_bytes() == final
    assert (run / "metrics.jsonl").read_text() == metrics
    assert run.is_dir(), "the refused start removed the user's run"


def test_a_run_folder_that_cannot_be_created_is_refused_before_hydra(tmp_path, monkeypatch):
    monkeypatch.setattr(run_dir, "_EXISTED", set())
    monkeypatch.setattr(run_dir, "_NAMED", set())
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match=r"hydra.run.dir=.*/a_file/run: .*a_file is a file, not a folder"):
        note_existing([f"hydra.run.dir={tmp_path}/a_file/run"])
    note_existing([f"hydra.run.dir={tmp_path}/new/run"])  # creatable: fine, and not the user's
    assert run_dir._EXISTED == set()


@pytest.mark.slow
def test_resume_auto_in_the_folder_hydra_makes_for_this_start_names_the_run_to_continue(tmp_path):
    earlier = tmp_path / "outputs" / "2026-01-01" / "10-00-00"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints" / "latest.json").write_text('{"step": 2, "folder": "step_000002"}\n')
    result = run_cli("train", *TINY_MODEL, "trainer.resume=auto", cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "is the new folder Hydra made for this start, so there is nothing in it to resume" in out
    assert "lmtrain train model.n_layers=2" in out and "hydra.run.dir=outputs/2026-01-01/10-00-00" in out
    assert out.count("nothing in it to resume") == 1 and "Traceback" not in out
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["2026-01-01"]  # the new folder went again
    assert [p.name for p in (tmp_path / "outputs" / "2026-01-01").iterdir()] == ["10-00-00"]
