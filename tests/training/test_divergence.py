"""Never train on NaN: a diverging run rolls back, then stops with exit code 3 naming the step; no checkpoint
on disk ever holds a non-finite weight."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmtrain.config import DivergenceAction, TrainerConfig
from lmtrain.errors import CheckpointError, Diverged
from lmtrain.runs.checkpoint import save_checkpoint
from lmtrain.runs.metrics import read_metrics
from lmtrain.training.divergence import DivergenceGuard

from conftest import FAST_TRAIN, TINY_MODEL, run_cli


def test_the_guard_names_the_first_non_finite_step_and_stop_raises(tmp_path):
    guard = DivergenceGuard(TrainerConfig(on_divergence=DivergenceAction.stop), torch.device("cpu"))
    guard.observe(1, torch.tensor(2.5), torch.tensor(1.0))
    assert guard.found() is None
    guard.observe(2, torch.tensor(3.0), torch.tensor(float("inf")))
    guard.observe(3, torch.tensor(float("nan")), None)
    assert guard.found() == 2 and "step 2 (loss 3, gradient norm inf)" in guard.describe()
    with pytest.raises(Diverged, match="diverged at step 2") as e:
        guard.roll_back(tmp_path, torch.nn.Linear(2, 2), None, None)
    assert e.value.exit_code == 3


def test_with_loss_scaling_an_inf_gradient_norm_is_a_skipped_step_not_a_divergence():
    guard = DivergenceGuard(TrainerConfig(), torch.device("cpu"), loss_scaling=True)  # fp16's GradScaler
    guard.observe(1, torch.tensor(2.5), torch.tensor(float("inf")))
    guard.observe(2, torch.tensor(2.4), torch.tensor(float("nan")))
    assert guard.found() is None
    guard.observe(3, torch.tensor(float("nan")), torch.tensor(1.0))
    assert guard.found() == 3


def test_a_checkpoint_is_never_written_with_non_finite_weights(tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite weights in weight"):
        save_checkpoint(tmp_path / "best", model, {}, tokenizer=None)
    assert not (tmp_path / "best").exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_diverging_run_rolls_back_then_stops_with_exit_3(tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", *TINY_MODEL, *FAST_TRAIN, "optimizer.lr=1e3", "scheduler.warmup_steps=0",
                     "trainer.max_steps=30", "trainer.save_every=2", "trainer.eval_every=2", "trainer.keep_last=1",
                     "trainer.max_rollbacks=2", "trainer.rollback_lr_scale=0.5", f"hydra.run.dir={run}")
    output = result.stdout + result.stderr
    assert result.returncode == 3, output[-3000:]
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "Training diverged at step" in errors[0] and "after 2 rollbacks" in errors[0]
    assert output.count("rolled back to") == 2 and "Traceback" not in output

    folders = [p for p in (run / "checkpoints").iterdir() if p.is_dir()]
    assert folders, "no checkpoint was saved before the divergence"
    for folder in folders:  # every step folder, and best/ if an evaluation made one
        weights = load_file(str(folder / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values()), folder
    if (run / "checkpoints" / "best").is_dir():
        assert json.loads((run / "checkpoints" / "best" / "eval.json").read_text())["val_loss"] < float("inf")
    records = read_metrics(run / "metrics.jsonl")
    rollback = [r for r in records if "rolled_back_from" in r]
    assert rollback and rollback[-1]["rollbacks"] == 2 and rollback[-1]["lr_factor"] == 0.25
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r)  # no NaN left in the log
