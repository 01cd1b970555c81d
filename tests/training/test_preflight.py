"""Checks before the first step: init_from's tokenizer and shapes before any data is read, and warnings for
settings that would waste a run."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from hydra import compose, initialize_config_module

from lmtrain.config import TokenizerKind, register_configs, to_train_config
from lmtrain.data.tokenizer import TextTokenizer, train_char
from lmtrain.errors import CheckpointError, DataError
from lmtrain.model import GPT
from lmtrain.runs.checkpoint import save_checkpoint
from lmtrain.training.preflight import init_from_checked, warn_before_training

from conftest import FAST_TRAIN, TINY_MODEL, run_cli

register_configs()
CPU_PEAK = 2e11  # FLOP/s: a few CPU cores' fp32 matmul rate


def config(*overrides: str):
    with initialize_config_module(config_module="lmtrain.configs", version_base="1.3"):
        return to_train_config(compose(config_name="train", overrides=list(overrides)))


def preflight(cfg, vocab: int = 4096) -> list[str]:
    with torch.device("meta"):  # the FLOPs need only the shapes
        model = GPT(dataclasses.replace(cfg.model, vocab_size=vocab))
    t = cfg.trainer
    tokens = t.batch_size * t.grad_accum_steps * cfg.model.block_size
    return warn_before_training(cfg, t.max_steps, tokens, model.flops_per_token(), CPU_PEAK, torch.device("cpu"))


def test_gpt_small_on_a_cpu_is_named_slow_before_the_first_step(caplog):
    with caplog.at_level(logging.INFO):
        messages = preflight(config("model=gpt_small", "optimizer.lr=6e-4", "trainer.max_steps=2000"), vocab=50304)
    slow = [m for m in messages if "FLOPs" in m]
    assert len(slow) == 1 and "2,000 steps take at least" in slow[0] and "on cpu" in slow[0]
    assert any(r.levelno == logging.WARNING and "FLOPs" in r.message for r in caplog.records)
    assert not [m for m in preflight(config()) if "FLOPs" in m]  # the default gpt_tiny run is fine


def test_a_warmup_as_long_as_the_run_is_warned_of():
    (warning,) = [m for m in preflight(config("trainer.max_steps=20")) if "warmup" in m]
    assert "scheduler.warmup_steps=30 >= the run's 20 steps" in warning
    assert "never reaching optimizer.lr=0.002" in warning and "scheduler.warmup_steps=2" in warning
    assert not [m for m in preflight(config("trainer.max_steps=31")) if "warmup" in m]


def test_evaluations_checkpoints_and_samples_a_short_run_never_reaches_are_named():
    messages = preflight(config("trainer.max_steps=50"))
    assert any("trainer.eval_every=100 > the run's 50 steps: the validation loss is measured once" in m
               for m in messages)
    assert any(m.startswith("trainer.save_every=200 > ") for m in messages)
    assert any(m.startswith("trainer.sample_every=200 > ") for m in messages)
    assert not [m for m in preflight(config()) if m.startswith("trainer.")]  # the default run reaches them all


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny model's checkpoint with a char tokenizer, as TINY_MODEL builds it."""
    tokenizer = TextTokenizer(train_char(iter(["abcdefgh "])))
    cfg = config(*TINY_MODEL, f"model.vocab_size={tokenizer.vocab_size}")
    return save_checkpoint(tmp_path / "ckpt", GPT(cfg.model), {}, tokenizer)


def test_init_from_brings_its_own_tokenizer_and_must_fit_the_model(checkpoint, tmp_path):
    cfg = init_from_checked(config(*TINY_MODEL, f"model.init_from={checkpoint}", "tokenizer=bpe"))
    assert cfg.tokenizer.kind == TokenizerKind.file and cfg.tokenizer.path == str(checkpoint / "tokenizer.json")
    with pytest.raises(CheckpointError, match=r"model.init_from=.*does not fit this model.*tok_emb.weight"):
        init_from_checked(config(*TINY_MODEL, "model.d_model=64", f"model.init_from={checkpoint}"))
    other = tmp_path / "other.json"
    TextTokenizer(train_char(iter(["xyz"]))).save(other)
    with pytest.raises(DataError, match="another tokenizer than tokenizer.path="):
        init_from_checked(config(*TINY_MODEL, f"model.init_from={checkpoint}", "tokenizer=file",
                                 f"tokenizer.path={other}"))


@pytest.mark.slow
def test_an_init_from_that_does_not_fit_is_refused_before_any_data_is_read(checkpoint, corpus):
    result = run_cli("train", *TINY_MODEL, *FAST_TRAIN, "model.n_layers=3", f"model.init_from={checkpoint}",
                     "data=text_files", f"data.train_files=[{corpus['train']}]", "hydra.run.dir=run",
                     cwd=corpus["train"].parent)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "missing blocks.2.attn.qkv.weight" in result.stdout and "Traceback" not in result.stdout + result.stderr
    assert "Tokeniz" not in result.stdout  # refused from the checkpoint's files alone
