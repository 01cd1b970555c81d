"""Checkpoints round-trip through safetensors and JSON, and refuse what does not fit, by name; a run directory
resolves to its best, else latest, else final checkpoint."""

import json
import os
import stat

import pytest
import torch

from lmtrain.config import ModelConfig, as_plain_dict
from lmtrain.data.tokenizer import TextTokenizer, train_char
from lmtrain.errors import CheckpointError
from lmtrain.model import GPT
from lmtrain.runs.checkpoint import load_weights, read_config, save_checkpoint
from lmtrain.runs.trained import load_trained, resolve_checkpoint


def model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{"vocab_size": 20, "d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 32,
                              "block_size": 8, **kw}))


@pytest.fixture
def tokenizer() -> TextTokenizer:
    return TextTokenizer(train_char(iter(["abcdef"])))


def test_round_trip_restores_every_weight(tmp_path, tokenizer):
    original = model()
    path = save_checkpoint(tmp_path / "ckpt", original, {"model": {"d_model": 16}}, tokenizer)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    restored = model()
    torch.nn.init.zeros_(restored.tok_emb.weight)
    load_weights(path, restored)
    for (name, a), b in zip(original.state_dict().items(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert restored.lm_head.weight.data_ptr() == restored.tok_emb.weight.data_ptr()  # still tied
    assert read_config(path) == {"model": {"d_model": 16}}
    assert TextTokenizer.load(path / "tokenizer.json").vocab_size == tokenizer.vocab_size


def test_saving_again_replaces_the_checkpoint_whole(tmp_path, tokenizer):
    save_checkpoint(tmp_path / "ckpt", model(), {"version": 1}, tokenizer)
    save_checkpoint(tmp_path / "ckpt", model(), {"version": 2}, tokenizer)
    assert read_config(tmp_path / "ckpt") == {"version": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folders left


def test_another_shape_is_refused_with_names_and_shapes(tmp_path, tokenizer):
    save_checkpoint(tmp_path / "ckpt", model(), {}, tokenizer)
    with pytest.raises(CheckpointError, match=r"tok_emb.weight: checkpoint \(20, 16\) vs model \(20, 32\)"):
        load_weights(tmp_path / "ckpt", model(d_model=32))
    with pytest.raises(CheckpointError, match=r"missing blocks.2"):
        load_weights(tmp_path / "ckpt", model(n_layers=3))


def test_truncated_weights_name_the_file(tmp_path, tokenizer):
    path = save_checkpoint(tmp_path / "ckpt", model(), {}, tokenizer)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated"):
        load_weights(path, model())


def test_missing_or_corrupt_config_is_named(tmp_path, tokenizer):
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        read_config(tmp_path)
    path = save_checkpoint(tmp_path / "ckpt", model(), {}, tokenizer)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is corrupt"):
        read_config(path)

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
    with pytest.raises(CheckpointError, match="is neither a checkpoint .*, a run directory .*, nor a Hugging Face"):
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


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_files_follow_the_users_umask(tmp_path, tokenizer, umask):
    previous = os.umask(umask)  # safetensors alone writes 0600 whatever the umask
    try:
        path = save_checkpoint(tmp_path / "ckpt", model(), {"model": {"d_model": 16}}, tokenizer)
    finally:
        os.umask(previous)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()}
    assert modes == {name: 0o666 & ~umask for name in ["config.json", "model.safetensors", "tokenizer.json"]}
