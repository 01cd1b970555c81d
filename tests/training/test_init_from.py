"""`model.init_from` of any checkpoint sets the run's model.*: its saved config gives the shape, and the user's own
settings (typed, or from a recipe) that contradict it are refused by name; the context may be shortened."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lmtrain.config import ModelConfig, PosEmb
from lmtrain.config.model import with_checkpoint_shape
from lmtrain.errors import ConfigError
from lmtrain.runs.trained import load_trained

from conftest import FAST_TRAIN, QUIET_TRAIN, TINY_MODEL, run_cli

SAVED = ModelConfig(name="saved", vocab_size=300, d_model=32, n_heads=2, n_layers=2, d_ff=64, block_size=16,
                    vocab_multiple=1)


def test_the_checkpoints_shape_wins_and_only_a_runs_own_keys_may_differ():
    given = ModelConfig(d_model=128, n_layers=4, dropout=0.1, name="mine", block_size=8, init_from="ckpt")
    model = with_checkpoint_shape(given, SAVED, {"dropout", "name", "block_size"}, "model.init_from=ckpt")
    assert (model.d_model, model.n_layers, model.vocab_size) == (32, 2, 300)  # the preset's 128 and 4 are not his
    assert (model.dropout, model.name, model.block_size, model.init_from) == (0.1, "mine", 8, "ckpt")
    with pytest.raises(ConfigError, match=r"model.init_from=ckpt sets the model's shape, and these settings differ "
                                          r"from it: model.d_model=128 \(the checkpoint's is 32\); model.n_layers=4 "
                                          r"\(the checkpoint's is 2\); drop them"):
        with_checkpoint_shape(given, SAVED, {"d_model", "n_layers"}, "model.init_from=ckpt")
    with pytest.raises(ConfigError, match="model.block_size=32 is longer than its 16 learned positions"):
        with_checkpoint_shape(ModelConfig(block_size=32), SAVED, {"block_size"}, "model.init_from=ckpt")
    rope = dataclasses.replace(SAVED, pos_emb=PosEmb.rope)
    assert with_checkpoint_shape(ModelConfig(block_size=64), rope, {"block_size"}, "k").block_size == 64  # no table
    with pytest.raises(ConfigError, match="model.block_size=64 is longer than its sliding window of 32 positions"):
        with_checkpoint_shape(ModelConfig(block_size=64), rope, {"block_size"}, "k", window=32)
    same = with_checkpoint_shape(ModelConfig(d_model=32, bias=True), SAVED, {"d_model", "bias"}, "k")
    assert same == SAVED  # agreeing with the checkpoint is no conflict


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus_module):
    """A tiny run's final checkpoint: 2 layers, d_model 32, a 16-token context, learned positions."""
    root = tmp_path_factory.mktemp("first")
    result = run_cli("train", *TINY_MODEL, *FAST_TRAIN, *QUIET_TRAIN, "trainer.max_steps=3", *corpus_module,
                     "hydra.run.dir=run", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "run/checkpoints/final"


@pytest.fixture(scope="module")
def corpus_module(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("text")
    words = "the quick brown fox jumps over the lazy dog while a small bird sings in the old tree".split()
    (folder / "train.txt").write_text("\n".join(" ".join(words[i % 7:] + words[:i % 7]) for i in range(300)))
    return ["data=text_files", f"data.train_files=[{folder / 'train.txt'}]"]


@pytest.mark.slow
def test_an_lmtrain_checkpoint_brings_its_shape_and_refuses_what_contradicts_it(checkpoint, corpus_module, tmp_path):
    saved = json.loads((checkpoint / "config.json").read_text())["model"]
    train = [*FAST_TRAIN, *QUIET_TRAIN, "trainer.max_steps=2", *corpus_module, f"model.init_from={checkpoint}"]
    result = run_cli("train", *train, "model.block_size=8", "hydra.run.dir=shorter", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr  # no model.* typed again but the shorter context
    model = json.loads((tmp_path / "shorter/checkpoints/final/config.json").read_text())["model"]
    assert {k: v for k, v in model.items() if k not in ("init_from", "block_size")} == {
        k: v for k, v in saved.items() if k not in ("init_from", "block_size")}
    assert model["block_size"] == 8
    assert load_trained(tmp_path / "shorter", torch.device("cpu")).model.pos_emb.weight.shape == (8, 32)

    refused = run_cli("train", *train, "model.d_model=128", "hydra.run.dir=refused", cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stdout + refused.stderr
    assert "model.d_model=128 (the checkpoint's is 32)" in refused.stdout  # the preset's own value, typed: his


@pytest.mark.slow
def test_a_recipes_model_settings_count_as_the_users_own(checkpoint, corpus_module, tmp_path):
    experiments = tmp_path / "configs/experiment"
    experiments.mkdir(parents=True)
    (experiments / "short.yaml").write_text("# @package _global_\nmodel:\n  block_size: 8\n  dropout: 0.1\n")
    (experiments / "deep.yaml").write_text("# @package _global_\nmodel:\n  n_layers: 6\n")
    train = ["--config-dir", str(tmp_path / "configs"), *FAST_TRAIN, *QUIET_TRAIN, "trainer.max_steps=2",
             *corpus_module, f"model.init_from={checkpoint}"]
    result = run_cli("train", *train, "experiment=short", "hydra.run.dir=short", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    model = json.loads((tmp_path / "short/checkpoints/final/config.json").read_text())["model"]
    assert (model["block_size"], model["dropout"], model["d_model"]) == (8, 0.1, 32)
    result = run_cli("train", *train, "experiment=deep", "hydra.run.dir=deep", cwd=tmp_path)
    assert result.returncode == 2 and "model.n_layers=6 (the checkpoint's is 2)" in result.stdout
