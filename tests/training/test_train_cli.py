"""`lmtrain train` end to end through the real CLI, on the built-in corpus, with a tiny model."""

import json
import math

import pytest
from safetensors.torch import load_file

from lmtrain.runs.metrics import read_metrics

from conftest import FAST_TRAIN, TINY_MODEL, run_cli

pytestmark = pytest.mark.slow


def test_training_lowers_the_loss_and_leaves_a_complete_run_dir(tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", *TINY_MODEL, *FAST_TRAIN, "trainer.max_steps=60", "trainer.eval_every=30",
                     "trainer.log_every=10", "optimizer.lr=3e-3", "scheduler.warmup_steps=5", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stdout + result.stderr
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60]
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(train[0])
    assert [r["step"] for r in evals] == [30, 60]
    assert {"step", "val_loss", "val_ppl"} <= set(evals[0])
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    vocab = json.loads((run / "checkpoints/final/config.json").read_text())["model"]["vocab_size"]
    assert evals[-1]["val_loss"] < 0.8 * math.log(vocab)
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    # What the user sees: the seed's log line format, and the final table.
    assert "Epoch 0, Batch 10, Loss: " in result.stdout
    assert "Training summary" in result.stdout and "final validation loss" in result.stdout
    assert "\x1b[" not in result.stdout  # no terminal control codes outside a terminal
    # The run dir: Hydra's config, a log, and a checkpoint that loads without pickle.
    assert (run / ".hydra/config.yaml").is_file() and (run / "train.log").is_file()
    final = run / "checkpoints/final"
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    weights = load_file(str(final / "model.safetensors"))
    assert weights["tok_emb.weight"].shape == (vocab, 32)


def test_epochs_bound_the_run_and_report_each_epoch(tmp_path, corpus):
    run = tmp_path / "run"
    result = run_cli("train", *TINY_MODEL, *FAST_TRAIN, "data=text_files", f"data.train_files=[{corpus['train']}]",
                     f"data.val_files=[{corpus['val']}]", "tokenizer=char", "trainer.max_steps=0", "trainer.epochs=2",
                     "trainer.batch_size=64", "trainer.log_every=50", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stdout + result.stderr
    ends = [r for r in read_metrics(run / "metrics.jsonl") if "epoch_avg_loss" in r]
    assert [r["epoch"] for r in ends] == [0, 1]
    assert "Epoch 0 complete. Average loss: " in result.stdout
    assert "Epoch 1 complete. Average loss: " in result.stdout


def test_gradient_accumulation_runs_end_to_end(tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", *TINY_MODEL, *FAST_TRAIN, "trainer.max_steps=3", "trainer.grad_accum_steps=3",
                     f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stdout + result.stderr
    train = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert train[-1]["tokens"] == 3 * 3 * 8 * 16  # steps x accumulation x batch x block


def test_cfg_job_shows_the_composed_config_and_runs_nothing(tmp_path):
    result = run_cli("train", "model=gpt_small", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for line in ("d_model: 768", "n_heads: 12", "n_layers: 12", "d_ff: 3072", "block_size: 1024"):
        assert line in result.stdout
    assert not (tmp_path / "outputs").exists()


def test_multirun_sweep_makes_one_run_dir_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("train", "-m", "optimizer.lr=1e-3,3e-4", "trainer.max_steps=5", *TINY_MODEL, *FAST_TRAIN,
                     f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stdout + result.stderr
    for name, lr_line in [("0_optimizer.lr=", "lr: 0.001\n"), ("1_optimizer.lr=", "lr: 0.0003\n")]:
        (job,) = sweep.glob(name + "*")  # named by its number and overrides
        records = read_metrics(job / "metrics.jsonl")
        assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
        assert lr_line in (job / ".hydra/config.yaml").read_text()
        assert (job / "checkpoints/final/model.safetensors").is_file()
    assert "2 jobs: 2 completed" in result.stdout and (sweep / "summary.csv").is_file()


def test_sample_prompts_are_checked_only_when_sampling(tmp_path):
    text = tmp_path / "abc.txt"
    text.write_text("abc cab bca " * 2000)  # no d, e or f: the default prompt "def " cannot be encoded
    common = [*TINY_MODEL, *FAST_TRAIN, "data=text_files", f"data.train_files=[{text}]", "tokenizer=char",
              "trainer.max_steps=2"]
    plain = run_cli("train", *common, "trainer.sample_every=0", f"hydra.run.dir={tmp_path}/plain")
    assert plain.returncode == 0, plain.stdout + plain.stderr
    sampling = run_cli("train", *common, "trainer.sample_every=1", f"hydra.run.dir={tmp_path}/sampling")
    assert sampling.returncode == 2 and "trainer.sample_prompts" in sampling.stdout + sampling.stderr
    assert "Traceback" not in sampling.stdout + sampling.stderr
