"""Sweeps through the real CLI: failures isolated, summaries that match metrics.jsonl, trackers, search, resume."""

import csv
import importlib.util
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lmtrain.runs.metrics import read_metrics
from lmtrain.runs.sweeps.status import read_status

from conftest import FAST_TRAIN, TINY_MODEL, run_cli

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
    assert "failed: trainer.batch_size=0 must be > 0" in out
    assert "3 jobs: 2 completed, 1 failed" in out and "Traceback" not in out
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
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    rows = read_summary(sweep)
    assert [r["status"] for r in rows] == ["completed"] * 3 + ["failed"]
    assert rows[3]["job"] == "1" and rows[3]["optimizer.lr"] == "-1.0"
    assert "optimizer.lr=-1.0 must be > 0" in rows[3]["error"]
    assert sorted(float(r["optimizer.lr"]) for r in rows[:3]) == [0.001, 0.003, 0.01]
    assert results.best_value == pytest.approx(float(rows[0]["val_loss"]), rel=1e-12)
    assert results.best_params["optimizer.lr"] == pytest.approx(float(rows[0]["optimizer.lr"]))
    assert all(math.isfinite(float(r["val_loss"])) for r in rows[:3])


@pytest.mark.skipif(not has("hydra_plugins.hydra_joblib_launcher"), reason="needs lmtrain[joblib]")
def test_joblib_launcher_runs_the_other_jobs_and_tags_their_lines(tmp_path):
    sweep = tmp_path / "parallel"
    result = run_cli("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SHORT, "trainer.max_steps=2",
                     "trainer.batch_size=4,0,8", f"hydra.sweep.dir={sweep}")
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "3 jobs: 2 completed, 1 failed" in out, out
    assert "[job 0] " in out and "[job 2] " in out  # parallel jobs' lines say whose they are
    statuses = {job: read_status(job_folder(sweep, job))["status"] for job in range(3)}
    assert statuses == {0: "completed", 1: "failed", 2: "completed"}


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
