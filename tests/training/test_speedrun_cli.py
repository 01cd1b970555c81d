"""optimizer=muon, scheduler=wsd and the model switches through the real CLI: the run learns, logs the WSD
learning rates, and a resume from a step checkpoint continues exactly as the uninterrupted run."""

import pytest
from safetensors.torch import load_file

from lmtrain.config import SchedulerConfig, SchedulerName
from lmtrain.runs.metrics import read_metrics
from lmtrain.training.optim import lr_at

from conftest import FAST_TRAIN, TINY_MODEL, run_cli

pytestmark = pytest.mark.slow

SPEEDRUN = [*TINY_MODEL, *FAST_TRAIN, "optimizer=muon", "optimizer.lr=3e-3", "optimizer.muon_lr=0.03",
            "scheduler=wsd", "scheduler.warmup_steps=2", "scheduler.decay_fraction=0.25", "scheduler.min_lr_ratio=0.1",
            "model.mlp=relu2", "model.tie_embeddings=false", "model.logit_softcap=10", "model.zero_init_proj=true",
            "trainer.max_steps=16", "trainer.save_every=8", "trainer.eval_every=8", "trainer.keep_last=0"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # deterministic sums, and a tiny model gains nothing from threads


def test_muon_wsd_and_switches_learn_and_resume_exactly(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    result = run_cli("train", *SPEEDRUN, f"hydra.run.dir={first}", env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    records = read_metrics(first / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    wsd = SchedulerConfig(name=SchedulerName.wsd, warmup_steps=2, decay_fraction=0.25, min_lr_ratio=0.1)
    assert [r["lr"] for r in steps] == pytest.approx([lr_at(r["step"] - 1, 16, 3e-3, wsd) for r in steps])

    # A new run dir resumes from the first run's step 8: Muon's and AdamW's states come back from safetensors.
    result = run_cli("train", *SPEEDRUN, f"trainer.resume={first}/checkpoints/step_000008",
                     f"hydra.run.dir={second}", env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Resuming from" in result.stdout + result.stderr
    resumed = [r for r in read_metrics(second / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in steps if r["step"] > 8]
    for name in ("model.safetensors", "optimizer.safetensors"):
        ours, theirs = (load_file(str(run / "checkpoints/step_000016" / name)) for run in (first, second))
        assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours), name
