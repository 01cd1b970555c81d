"""Sweeps through the real CLI: failures isolated, summaries that match metrics.jsonl, trackers, search, resume."""

import csv
import importlib.util
import math
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lmtrain.runs.metrics import read_metrics
from lmtrain.runs.records import read_status

from conftest import FAST_TRAIN, TINY_MODEL, read_until, run_cli, start

pytestmark = pytest.mark.slow

SHORT = ["trainer.max_steps=4", "trainer.eval_every=2", *TINY_MODEL, *FAST_TRAIN]


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def job_folder(sweep: Path, job: int) -> Path:
    (folder,) = [p for p in sweep.iterdir() if p.name.split("_", 1)[0] == str(job)]
    return folder


def read_summary(sweep: Path) -> list[dict]:
    with open(sweep / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def mean_speed(train: list[dict]) -> float:
    speeds = [r["tokens_per_s"] for r in train if r["tokens_per_s"] is not None]  # null while warming up
    return sum(speeds) / len(speeds)


def expected_row(folder: Path) -> dict:
    """What summary.csv must say about a run, worked out here from its metrics.jsonl alone."""
    records = read_metrics(folder / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    return {"val_loss": evals[-1]["val_loss"], "best_val_loss": best["val_loss"], "best_step": best["step"],
            "train_loss": train[-1]["loss"], "steps": train[-1]["step"], "tokens": train[-1]["tokens"],
            "wall_s": records[-1]["elapsed_s"], "tokens_per_s": mean_speed(train)}


def wandb_history(run_file: Path) -> list[dict]:
    """The history records of an offline W&B run file (a leveldb-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, payload, out = run_file.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                out.append({item.key or "/".join(item.nested_key): float(item.value_json)
                            for item in record.history.item})
    return out


@pytest.mark.skipif(not (has("tensorboard") and has("wandb")), reason="needs lmtrain[tensorboard,wandb]")
def test_a_failing_job_leaves_the_others_a_true_summary_and_trackers_and_a_rerun_skips_finished_jobs(tmp_path):
    sweep = tmp_path / "files=[/x]"  # rich markup in every path the sweep prints
    args = ["train", "-m", *SHORT, "trainer.batch_size=4,0,8", "logger=[tensorboard,wandb]",
            f'hydra.sweep.dir="{sweep}"']
    result = run_cli(*args)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "3 jobs: 2 completed, 1 failed" in out and "Traceback" not in out
    assert "  job 1: failed: trainer.batch_size=0 must be > 0" in out  # the list of jobs that did not complete
    assert "Error executing job" not in out and "HYDRA_FULL_ERROR" not in out  # said once, by the summary
    assert "MarkupError" not in out and "Training summary" in out

    # Jobs 0 and 2 ran to the end; job 1 failed, and says why in its status.json, its log and the summary.
    for job in (0, 2):
        status = read_status(job_folder(sweep, job))
        assert status["status"] == "completed" and status["steps"] == 4
        assert (job_folder(sweep, job) / "loss.png").read_bytes()[:4] == b"\x89PNG"
    failed = job_folder(sweep, 1)
    assert read_status(failed) == {"job": 1, "status": "failed", "error": "trainer.batch_size=0 must be > 0"}
    assert "trainer.batch_size=0 must be > 0" in (failed / "train.log").read_text()
    assert (sweep / "summary.png").read_bytes()[:4] == b"\x89PNG" and (sweep / "summary.md").is_file()

    # Every value in summary.csv is the one metrics.jsonl holds; best first, the failed job last.
    rows = read_summary(sweep)
    assert [r["status"] for r in rows] == ["completed", "completed", "failed"]
    assert float(rows[0]["val_loss"]) <= float(rows[1]["val_loss"])
    assert rows[2]["job"] == "1" and rows[2]["trainer.batch_size"] == "0"
    assert rows[2]["error"] == "trainer.batch_size=0 must be > 0"
    for row in rows[:2]:
        folder = sweep / row["run"]
        assert row["trainer.batch_size"] == OmegaConf.load(folder / ".hydra/config.yaml").trainer.batch_size.__str__()
        assert read_status(folder)["value"] == float(row["val_loss"])  # what the sweeper was told
        for key, value in expected_row(folder).items():
            assert float(row[key]) == pytest.approx(value, rel=1e-12), key

    # TensorBoard's event files and the offline W&B run hold the same losses as metrics.jsonl.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = job_folder(sweep, 2)
    records = read_metrics(folder / "metrics.jsonl")
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    val_losses = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    events = EventAccumulator(str(folder / "tensorboard")).Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(losses, rel=1e-6)
    assert {e.step: e.value for e in events.Scalars("val/loss")} == pytest.approx(val_losses, rel=1e-6)
    (run_file,) = (folder / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    assert {int(h["_step"]): h["train/loss"] for h in history if "train/loss" in h} == pytest.approx(losses)
    assert {int(h["_step"]): h["val/loss"] for h in history if "val/loss" in h} == pytest.approx(val_losses)

    # Rerunning the sweep with resume=auto skips the finished jobs and tries the failed one again.
    before = (job_folder(sweep, 0) / "metrics.jsonl").read_text()
    rerun = run_cli(*args, "trainer.resume=auto")
    assert rerun.returncode != 0
    assert rerun.stdout.count("Job already completed") == 2, rerun.stdout
    assert (job_folder(sweep, 0) / "metrics.jsonl").read_text() == before
    assert [r["status"] for r in read_summary(sweep)] == ["completed", "completed", "failed"]


@pytest.mark.skipif(not has("hydra_plugins.hydra_optuna_sweeper"), reason="needs lmtrain[optuna]")
def test_optuna_study_with_a_failing_trial_completes_and_reports_the_best_job(tmp_path):
    sweep = tmp_path / "study"
    # With this seed the random sampler tries lr 0.01, -1.0 (a config error), 0.001, 0.003: all four, in one batch.
    result = run_cli("train", "-m", "hparams_search=lr_optuna", "hydra/sweeper/sampler=random",
                     "hydra.sweeper.sampler.seed=9", "hydra.sweeper.n_trials=4",
                     "optimizer.lr=choice(0.003,0.01,-1.0,0.001)", *SHORT, "trainer.max_steps=2",
                     f"hydra.sweep.dir={sweep}")
    out = result.stdout + result.stderr
    assert "4 jobs: 3 completed, 1 failed" in out, out
    assert result.returncode == 0  # the study finished: a failed trial is part of searching
    assert "alembic" not in out and "Error executing job" not in out and "\x1b[" not in out
    assert "  job 1: failed: optimizer.lr=-1.0 must be > 0" in out
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    rows = read_summary(sweep)
    assert [r["status"] for r in rows] == ["completed"] * 3 + ["failed"]
    assert rows[3]["job"] == "1" and rows[3]["optimizer.lr"] == "-1.0"
    assert "optimizer.lr=-1.0 must be > 0" in rows[3]["error"]
    assert sorted(float(r["optimizer.lr"]) for r in rows[:3]) == [0.001, 0.003, 0.01]
    assert results.best_value == pytest.approx(float(rows[0]["val_loss"]), rel=1e-12)
    assert results.best_params["optimizer.lr"] == pytest.approx(float(rows[0]["optimizer.lr"]))
    assert all(math.isfinite(float(r["val_loss"])) for r in rows[:3])

    # The same study where no failure is allowed stops early, and says why.
    stopped = run_cli("train", "-m", "hparams_search=lr_optuna", "hydra/sweeper/sampler=random",
                      "hydra.sweeper.sampler.seed=9", "hydra.sweeper.n_trials=8", "hydra.sweeper.max_failure_rate=0.0",
                      "optimizer.lr=choice(0.003,0.01,-1.0,0.001)", *SHORT, "trainer.max_steps=2",
                      f"hydra.sweep.dir={tmp_path / 'strict'}")
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode == 1, out
    assert "The search stopped early: more than hydra.sweeper.max_failure_rate=0.0 of a batch of trials failed" in out
    assert "4 jobs: 3 completed, 1 failed" in out  # the first batch of 4; the study never asked for the rest


@pytest.mark.skipif(not has("hydra_plugins.hydra_joblib_launcher"), reason="needs lmtrain[joblib]")
def test_joblib_launcher_runs_the_other_jobs_and_tags_their_lines(tmp_path):
    sweep = tmp_path / "parallel"
    result = run_cli("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SHORT, "trainer.max_steps=2",
                     "trainer.batch_size=4,0,8", f"hydra.sweep.dir={sweep}")
    out = result.stdout + result.stderr
    assert result.returncode == 1 and "3 jobs: 2 completed, 1 failed" in out, out
    assert "[job 0] " in out and "[job 2] " in out  # parallel jobs' lines say whose they are
    assert "[job 0] Training summary" in out and "[job 2] Training summary" in out  # and so do their tables
    assert "Error executing job" not in out and "  job 1: failed: trainer.batch_size=0 must be > 0" in out
    statuses = {job: read_status(job_folder(sweep, job))["status"] for job in range(3)}
    assert statuses == {0: "completed", 1: "failed", 2: "completed"}


def test_a_rerun_keeps_earlier_records_and_a_second_sweep_counts_only_its_own_jobs(tmp_path):
    sweep, short = tmp_path / "sweep", [*SHORT, "trainer.max_steps=2"]
    first = run_cli("train", "-m", "optimizer.lr=1e-3,2e-3", *short, f"hydra.sweep.dir={sweep}")
    assert first.returncode == 0, first.stdout + first.stderr
    records = {job: read_status(job_folder(sweep, job)) for job in (0, 1)}
    assert all(r["status"] == "completed" for r in records.values())

    # Run again without trainer.resume=auto: each job is refused, and its folder's record stays as it was.
    again = run_cli("train", "-m", "optimizer.lr=1e-3,2e-3", *short, f"hydra.sweep.dir={sweep}")
    out = again.stdout + again.stderr
    assert again.returncode == 1, out
    assert {job: read_status(job_folder(sweep, job)) for job in (0, 1)} == records
    assert "2 jobs: 2 failed" in out and out.count("already holds a run") >= 2 and "Error executing job" not in out
    assert [r["status"] for r in read_summary(sweep)] == ["failed", "failed"]  # this attempt's outcome

    # Another sweep into the same folder: its summary and exit status are its own jobs'; the old ones listed apart.
    other = run_cli("train", "-m", *short, "trainer.batch_size=4,6", "optimizer.lr=1e-3", f"hydra.sweep.dir={sweep}")
    out = other.stdout + other.stderr
    assert other.returncode == 0, out
    assert "2 jobs: 2 completed" in out and "Not counted: 2 earlier runs (jobs 0, 1) in" in out
    assert sorted(r["trainer.batch_size"] for r in read_summary(sweep)) == ["4", "6"]


def test_a_sweep_stopped_by_ctrl_c_exits_130_and_its_later_jobs_are_not_started(tmp_path):
    sweep = tmp_path / "sweep"
    proc = start("-m", "optimizer.lr=1e-3,2e-3,3e-3", *TINY_MODEL, *FAST_TRAIN, "trainer.max_steps=100000",
                 "trainer.eval_every=100000", "trainer.save_every=0", "trainer.sample_every=0",
                 f"hydra.sweep.dir={sweep}")
    read_until(proc, "Batch 3,")
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, out
    statuses = {job: read_status(job_folder(sweep, job))["status"] for job in range(3)}
    assert statuses == {0: "stopped", 1: "not started", 2: "not started"}
    assert "3 jobs: 1 stopped, 2 not started" in out and "job 1: not started (the sweep was stopped by SIGINT)" in out
    assert "Continue this sweep with:" in out and "trainer.resume=auto" in out and "Error executing job" not in out


def test_a_sweep_folder_that_cannot_be_written_is_one_line(tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs",
                                                    str(read_only)]).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("root, and no read-only tmpfs could be mounted")
        read_only.chmod(0o555)
    try:
        result = run_cli("train", "-m", "optimizer.lr=1e-3,2e-3", *SHORT, f"hydra.sweep.dir={read_only}/sweep")
    finally:
        if mounted:
            subprocess.run(["umount", str(read_only)])
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert f"hydra.sweep.dir={read_only}/sweep: {read_only} is not writable" in out and "Traceback" not in out


def test_installed_bash_completion_completes_commands_groups_choices_and_keys(tmp_path):
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "lmtrain").exists():
        pytest.skip("the lmtrain console script is not installed beside this Python")

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        script = (f'eval "$(lmtrain train -sc install=bash)"\n'
                  f'COMP_LINE="{line}"; COMP_POINT={len(line)}; COMP_WORDS=({" ".join(repr(w) for w in words)}); '
                  f'COMP_CWORD={len(words) - 1}\n_lmtrain_completion\nprintf "%s\\n" "${{COMPREPLY[@]}}"\n')
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("lmtrain tr") == ["train"]
    assert set(complete("lmtrain ")) >= {"train", "generate", "summarize", "plot"}
    assert {"model=gpt_tiny", "model=gpt_small", "model=llama_tiny"} <= set(complete("lmtrain train model="))
    assert "trainer.max_steps=" in complete("lmtrain train trainer.max_")
