"""Which checkpoint a path means (best, else latest, else final), and loading it for use."""

import json

import pytest
import torch

from lmtrain.checkpoint import save_checkpoint
from lmtrain.config import ModelConfig, as_plain_dict
from lmtrain.data.tokenizer import TextTokenizer, train_char
from lmtrain.errors import CheckpointError
from lmtrain.model import GPT
from lmtrain.trained import load_trained, resolve_checkpoint


def model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{"vocab_size": 20, "d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 32,
                              "block_size": 8, **kw}))


@pytest.fixture
def tokenizer() -> TextTokenizer:
    return TextTokenizer(train_char(iter(["abcdef"])))


def test_a_run_directory_resolves_to_best_then_latest_then_final(tmp_path, tokenizer):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    save_checkpoint(ckpts / "final", model(), {}, tokenizer)
    assert resolve_checkpoint(run) == ckpts / "final"
    assert resolve_checkpoint(ckpts) == ckpts / "final"  # the checkpoints/ folder itself works too
    assert resolve_checkpoint(ckpts / "final") == ckpts / "final"
    for step in (100, 200, 300):
        save_checkpoint(ckpts / f"step_{step:06d}", model(), {}, tokenizer)
    assert resolve_checkpoint(run) == ckpts / "step_000300"  # no latest.json: the newest step
    (ckpts / "latest.json").write_text(json.dumps({"step": 200, "folder": "step_000200"}))
    assert resolve_checkpoint(run) == ckpts / "step_000200"  # step 300's save never finished
    save_checkpoint(ckpts / "best", model(), {}, tokenizer)
    assert resolve_checkpoint(run) == ckpts / "best"


def test_a_path_that_is_no_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint=.*nope: no such directory"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="is neither a checkpoint .* nor a run directory"):
        resolve_checkpoint(tmp_path)


def test_load_trained_builds_the_saved_model_in_eval_mode(tmp_path, tokenizer):
    original = model(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=1, tie_embeddings=False)
    config = {"model": as_plain_dict(original.cfg), "data": {"name": "x"}}
    save_checkpoint(tmp_path / "run/checkpoints/final", original, config, tokenizer)
    trained = load_trained(tmp_path / "run", torch.device("cpu"))
    assert trained.path == tmp_path / "run/checkpoints/final" and trained.config == config
    assert not trained.model.training and trained.tokenizer.vocab_size == tokenizer.vocab_size
    idx = torch.randint(0, 20, (1, 8))
    torch.testing.assert_close(trained.model(idx), original.eval()(idx))
    (tmp_path / "run/checkpoints/final/config.json").write_text('{"model": {"d_modle": 16}}')
    with pytest.raises(CheckpointError, match="config.json has no usable model settings: d_modle: Key 'd_modle'"):
        load_trained(tmp_path / "run", torch.device("cpu"))
