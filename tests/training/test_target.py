"""trainer.target_val_loss ends training at the first whole validation pass at or below it; with
trainer.eval_screen_batches each evaluation first scores a subset and runs the whole pass only near the target."""

from __future__ import annotations

from pathlib import Path

from lmtrain.config import EarlyStoppingConfig
from lmtrain.runs.metrics import read_metrics
from lmtrain.training.early_stopping import EarlyStopping

from conftest import make_trainer, run_cli


def test_training_ends_at_the_first_whole_pass_at_or_below_the_target(tmp_path: Path, caplog):
    trainer = make_trainer(tmp_path, "trainer.max_steps=20", "trainer.eval_every=5", "trainer.target_val_loss=100")
    with caplog.at_level("INFO"):
        result = trainer.fit()
    assert result.steps == 5 and trainer.early_stopping.reached_target
    assert "Stopping early at step 5: its validation loss" in caplog.text
    assert "reached trainer.target_val_loss=100 at step 5" in caplog.text
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert max(r["step"] for r in records if "loss" in r) == 5
    assert [r["step"] for r in records if "val_loss" in r] == [5]  # no second pass at the end
    assert (tmp_path / "checkpoints" / "final").is_dir() and (tmp_path / "checkpoints" / "step_000005").is_dir()


def test_screening_passes_call_the_whole_pass_only_near_the_target(tmp_path: Path):
    trainer = make_trainer(tmp_path, "trainer.max_steps=20", "trainer.eval_every=2", "trainer.eval_batches=4",
                           "trainer.target_val_loss=2.0", "trainer.eval_screen_batches=1", "trainer.log_every=2")
    screens, wholes = iter([5.0, 4.0, 2.03, 2.01]), iter([2.2, 1.99])
    seen = []

    def evaluate(n_batches=None):
        seen.append(n_batches)
        return next(screens) if n_batches else next(wholes)

    trainer.evaluate = evaluate
    trainer.fit()
    assert seen == [1, 1, 1, None, 1, None]  # whole passes only once a screen read <= 2.05
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["val_screen_loss"]) for r in records if "val_screen_loss" in r] == [
        (2, 5.0), (4, 4.0), (6, 2.03), (8, 2.01)]
    assert [(r["step"], r["val_loss"]) for r in records if "val_loss" in r] == [(6, 2.2), (8, 1.99)]
    assert trainer.step == 8 and trainer.early_stopping.reached_target
    (early,) = [r for r in records if r.get("stopped_early")]
    assert (early["step"], early["best_val_loss"], early["reached_target"]) == (8, 1.99, True)


def test_screening_settings_are_checked_naming_the_key(tmp_path: Path):
    result = run_cli("train", "trainer.eval_screen_batches=2", cwd=tmp_path)
    assert result.returncode == 2 and "set that too" in result.stdout + result.stderr
    result = run_cli("train", "trainer.eval_screen_batches=20", "trainer.target_val_loss=2", cwd=tmp_path)
    message = "trainer.eval_screen_batches=20 must be >= 0 and below trainer.eval_batches=20"
    assert result.returncode == 2 and message in result.stdout + result.stderr


def test_a_run_that_reached_its_target_goes_on_when_resumed_with_a_lower_one():
    first = EarlyStopping(EarlyStoppingConfig(), target_val_loss=2.0)
    assert not first.observe(10, 2.5) and first.observe(20, 1.95) and first.stopped
    lower = EarlyStopping(EarlyStoppingConfig(), target_val_loss=1.9)
    lower.load_state_dict(first.state_dict())
    assert not lower.stopped and not lower.observe(30, 1.92)
    assert lower.observe(40, 1.85) and lower.reached == (40, 1.85)
