"""configs/debug/: fast (every phase in seconds, a resume included), overfit (a PASS/FAIL verdict on one batch),
profile (a torch.profiler trace and a table of the top ops), through the real CLI."""

from __future__ import annotations

import json

import pytest
import torch

from lmtrain.errors import CheckpointError
from lmtrain.runs.metrics import read_metrics
from lmtrain.training.debugging import check_resume

from conftest import ONE_THREAD, TINY_MODEL, make_trainer, run_cli, step_losses

SMALL = [*TINY_MODEL, "data.max_documents=150", "tokenizer.vocab_size=300", "trainer.batch_size=8",
         "trainer.eval_batches=2", "trainer.progress=false", "trainer.precision=fp32"]


def test_fast_runs_every_phase_and_resumes_from_its_checkpoint_exactly(tmp_path):
    run = tmp_path / "fast"
    result = run_cli("train", "debug=fast", *SMALL, f"hydra.run.dir={run}", env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    records = read_metrics(run / "metrics.jsonl")
    assert list(step_losses(run)) == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert [r["step"] for r in records if "samples" in r] == [4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "final", "latest.json", "step_000002",
                                                                       "step_000004"]
    assert "Resume check: step_000002, read back from disk, holds the live weights" in " ".join(result.stdout.split())
    # resuming from the checkpoint changed nothing: the same run without the check logs the same losses
    plain = tmp_path / "plain"
    again = run_cli("train", "debug=fast", "trainer.resume_check=false", *SMALL, f"hydra.run.dir={plain}",
                    env=ONE_THREAD)
    assert again.returncode == 0 and "Resume check" not in again.stdout
    assert step_losses(run) == step_losses(plain)


def test_the_resume_check_refuses_a_checkpoint_that_does_not_hold_the_live_state(tmp_path):
    trainer = make_trainer(tmp_path / "run", "trainer.max_steps=2")
    folder = trainer._save()
    with torch.no_grad():
        next(trainer.model.parameters()).add_(1.0)
    with pytest.raises(CheckpointError, match="resume check: .* differs in weights: "):
        check_resume(folder, trainer.model, trainer.optimizer, trainer.train_loader)


@pytest.mark.parametrize("extra, verdict", [([], "Overfit check PASSED: the training loss on 1 repeated batch is "),
                                            (["optimizer.lr=1e-6", "trainer.max_steps=20"], "Overfit check FAILED: ")])
def test_overfit_says_pass_or_fail_in_one_line(tmp_path, extra, verdict):
    run = tmp_path / "overfit"
    result = run_cli("train", "debug=overfit", *SMALL, "optimizer.lr=1e-2", *extra, f"hydra.run.dir={run}",
                     env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert verdict in " ".join(result.stdout.split())
    records = read_metrics(run / "metrics.jsonl")
    assert not [r for r in records if "epoch_avg_loss" in r]  # an "epoch" of one batch is no news
    if "PASSED" in verdict:
        assert list(step_losses(run).values())[-1] < 0.05


def test_profile_writes_a_trace_and_a_table_of_the_top_ops(tmp_path):
    run = tmp_path / "profile"
    result = run_cli("train", "debug=profile", *SMALL, f"hydra.run.dir={run}", env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    trace = json.loads((run / "profile" / "trace.json").read_text())
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
    table = (run / "profile" / "top_ops.txt").read_text()
    assert "Self CPU time total" in table and "aten::" in table
    assert "Profile of 5 steps, by self_cpu_time_total" in result.stdout
