"""trainer.early_stopping: a run whose validation loss stops improving ends as a completed run (exit 0), and
says so in its summary, status.json and metrics.jsonl."""

from __future__ import annotations

import pytest

from lmtrain.config import EarlyStoppingConfig
from lmtrain.runs.metrics import read_metrics
from lmtrain.runs.sweeps.status import read_status
from lmtrain.training.early_stopping import EarlyStopping

from conftest import FAST_TRAIN, TINY_MODEL, run_cli


def test_patience_counts_evaluations_without_an_improvement_larger_than_min_delta():
    stop = EarlyStopping(EarlyStoppingConfig(patience=2, min_delta=0.05))
    assert not stop.observe(10, 3.0) and not stop.observe(20, 2.9)  # 2.9: better by more than 0.05
    assert not stop.observe(30, 2.87)  # better, but by less than min_delta: a wait
    assert stop.observe(40, 2.95) and stop.stopped
    assert stop.best_step == 20 and "in 2 evaluations" in stop.reason() and "2.9000, was at step 20" in stop.reason()
    resumed = EarlyStopping(EarlyStoppingConfig(patience=3))  # resumed with more patience: it goes on
    resumed.load_state_dict(stop.state_dict())
    assert (resumed.best, resumed.best_step, resumed.waited, resumed.stopped) == (2.9, 20, 2, False)
    never = EarlyStopping(EarlyStoppingConfig(patience=0))
    assert not any(never.observe(s, 5.0) for s in range(10))


def test_a_run_stops_early_completes_and_says_so(tmp_path):
    run = tmp_path / "run"
    # min_delta 100: no evaluation after the first counts as better, so patience 2 stops at the third (step 6)
    args = [*TINY_MODEL, *FAST_TRAIN, "trainer.max_steps=20", "trainer.eval_every=2", "trainer.save_every=0",
            "trainer.early_stopping.patience=2", "trainer.early_stopping.min_delta=100", f"hydra.run.dir={run}"]
    result = run_cli("train", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    records = read_metrics(run / "metrics.jsonl")
    assert max(r["step"] for r in records if "loss" in r) == 6
    (early,) = [r for r in records if r.get("stopped_early")]
    assert early["step"] == 6 and early["best_step"] == 2
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4, 6]  # no second evaluation at the stop
    status = read_status(run)
    assert status["status"] == "completed" and status["stopped_early"] == 6 and status["steps"] == 6
    out = " ".join(result.stdout.split())
    assert "Stopping early at step 6" in out and "stopped early" in out
    assert (run / "checkpoints" / "final" / "model.safetensors").is_file()
    again = run_cli("train", *args, "trainer.resume=auto")  # a run that stopped early is finished
    assert again.returncode == 0 and "nothing left to train" in again.stdout


@pytest.mark.parametrize("override, message", [
    ("trainer.early_stopping.patience=-1", "trainer.early_stopping.patience=-1 must be >= 0"),
    ("trainer.early_stopping.min_delta=-0.5", "trainer.early_stopping.min_delta=-0.5 must be >= 0"),
])
def test_impossible_settings_are_named(tmp_path, override, message):
    result = run_cli("train", override, f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2 and message in result.stdout + result.stderr
