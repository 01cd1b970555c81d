"""The shipped `experiment=` recipes compose as documented and run end to end; metrics carry elapsed time."""

import json

import pytest

from lmtrain.runs.metrics import read_metrics

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_shakespeare_char_reproduces_nanogpts_cpu_recipe(tmp_path):
    result = run_cli("train", "experiment=shakespeare_char", "data.train_files=[input.txt]", "--cfg", "job",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for line in ("n_layers: 4", "n_heads: 4", "d_model: 128", "d_ff: 512", "block_size: 64", "dropout: 0.0",
                 "bias: false", "source: text_files", "val_fraction: 0.1", "kind: char", "lr: 0.001", "- 0.99",
                 "weight_decay: 0.1", "warmup_steps: 100", "max_steps: 2000", "batch_size: 12", "precision: auto"):
        assert f"  {line}\n" in result.stdout, line


def test_speedrun_runs_end_to_end_and_logs_elapsed_time(tmp_path, corpus):
    run = tmp_path / "run"
    result = run_cli("train", "experiment=shakespeare_char_speedrun", f"data.train_files=[{corpus['train']}]",
                     "trainer.max_steps=4", "trainer.eval_every=2", "trainer.log_every=2", "trainer.eval_batches=2",
                     "trainer.eval_screen_batches=1", "trainer.progress=false", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stdout + result.stderr
    config = json.loads((run / "checkpoints/final/config.json").read_text())
    assert config["model"]["pos_emb"] == "rope" and config["model"]["block_size"] == 128
    assert config["trainer"]["precision"] == "auto" and config["tokenizer"]["kind"] == "char"
    assert "Precision bf16: " in result.stdout or "Precision fp32: " in result.stdout  # what auto chose, and why
    records = read_metrics(run / "metrics.jsonl")
    # screened at step 2 (far from 1.886: no whole pass), the whole split at the end
    assert [r["step"] for r in records if "val_screen_loss" in r] == [2]
    assert [r["step"] for r in records if "val_loss" in r] == [4]
    elapsed = [r["elapsed_s"] for r in records]
    assert all(e > 0 for e in elapsed) and elapsed == sorted(elapsed)


def test_unknown_experiment_names_the_choices(tmp_path):
    result = run_cli("train", "experiment=nope", cwd=tmp_path)
    assert result.returncode != 0
    assert "experiment/nope" in result.stderr and "shakespeare_char_speedrun" in result.stderr
