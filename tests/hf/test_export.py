"""Export to Hugging Face transformers: the exported model computes lmtrain's logits (fp32, within 1e-4) for
both architectures, its tokenizer loads with AutoTokenizer, and what cannot map is refused by name."""

from __future__ import annotations

import pytest
import torch

from lmtrain.config import ModelConfig, RopeScaling, RopeScalingKind, as_plain_dict
from lmtrain.data.tokenizer import END_OF_TEXT, PAD, TextTokenizer, train_bpe
from lmtrain.errors import ConfigError
from lmtrain.hf.export import export_hf, hf_architecture
from lmtrain.model import GPT
from lmtrain.runs.checkpoint import save_checkpoint
from lmtrain.runs.trained import load_trained

from conftest import train_tokenizer

transformers = pytest.importorskip("transformers")

TEXT = "def main(argv):\n    return sum(x * 2 for x in argv)  # héllo wörld\n"
GPT2_CASES = {"gpt2-tied": dict(),
              "gpt2-untied-no-bias-padded": dict(tie_embeddings=False, bias=False, vocab_multiple=64),
              "gpt2-relu2-zero-init": dict(mlp="relu2", zero_init_proj=True)}
LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, bias=False, tie_embeddings=False,
             vocab_multiple=64)
LLAMA_CASES = {"llama-gqa": LLAMA,
               "llama-tied-bias-theta": {**LLAMA, "n_kv_heads": None, "bias": True, "tie_embeddings": True,
                                         "rope_theta": 500.0, "norm_eps": 1e-6},
               "llama3-rope-scaling": {**LLAMA, "rope_theta": 500000.0, "rope_scaling": RopeScaling(
                   kind=RopeScalingKind.llama3, factor=8.0, original_max_positions=16)},
               "qwen2-qkv-bias": {**LLAMA, "qkv_bias": True, "tie_embeddings": True}}
EXPORTED_AS = {"qwen2-qkv-bias": "Qwen2ForCausalLM"}


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer(train_bpe(iter([TEXT] * 20), 300, 2))


def trained_checkpoint(tmp_path, tokenizer, **arch):
    """A checkpoint of a tiny model whose weights are all random (norms and biases too), so every tensor counts."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size + 4, d_model=32, n_heads=4, n_layers=2, d_ff=64,
                      block_size=32, **arch)  # 4 ids of vocabulary padding, as model.vocab_size may add
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    path = save_checkpoint(tmp_path / "ckpt", model, {"model": as_plain_dict(cfg)}, tokenizer)
    return load_trained(path, torch.device("cpu"))


@pytest.mark.parametrize("case, arch", [*GPT2_CASES.items(), *LLAMA_CASES.items()], ids=[*GPT2_CASES, *LLAMA_CASES])
def test_exported_model_gives_lmtrains_logits(tmp_path, tokenizer, case, arch):
    if EXPORTED_AS.get(case) == "Qwen2ForCausalLM":  # transformers 5 gives any qwen2 folder Qwen2's pre-tokenizer
        tokenizer = TextTokenizer(train_tokenizer([END_OF_TEXT, PAD], None, split=True))
    trained = trained_checkpoint(tmp_path, tokenizer, **arch)
    out = export_hf(trained.model, trained.tokenizer, trained.path, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected = EXPORTED_AS.get(case, "GPT2LMHeadModel" if arch.get("pos_emb") != "rope" else "LlamaForCausalLM")
    assert type(hf).__name__ == expected
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tokenizer(TEXT)["input_ids"]
    assert ids == tokenizer.encode(TEXT) and hf_tokenizer.decode(ids) == TEXT
    assert hf_tokenizer.eos_token_id == tokenizer.eot_id and hf_tokenizer.pad_token_id is not None
    idx = torch.tensor([ids[:32], ids[-32:]])
    with torch.no_grad():
        ours, theirs = trained.model(idx), hf(idx).logits
    assert ours.std() > 0.5  # far from zero, so a wrong mapping could not hide
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch, message", [
    (dict(qk_norm=True), "model.qk_norm=true has no counterpart in GPT-2 or Llama"),
    (dict(n_kv_heads=2), "GPT-2 has no grouped-query attention"),
    (dict(mlp="swiglu"), "model.pos_emb=learned, model.norm=layernorm, model.mlp=swiglu is neither GPT-2"),
    (dict(pos_emb="rope", norm="rmsnorm"), "model.mlp=gelu is neither GPT-2"),
    (dict(pos_emb="rope", norm="rmsnorm", mlp="relu2"), "model.mlp=relu2 is neither GPT-2"),
    (dict(logit_softcap=15.0), "model.logit_softcap=15.0 has no counterpart in GPT-2 or Llama"),
    (dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", logit_softcap=30.0), "model.logit_softcap=30.0"),
])
def test_what_transformers_cannot_compute_is_refused_by_name(arch, message):
    with pytest.raises(ConfigError, match=message):
        hf_architecture(ModelConfig(vocab_size=10, **arch))


def test_an_export_replaces_only_an_earlier_export_and_never_its_checkpoint(tmp_path, tokenizer):
    trained = trained_checkpoint(tmp_path, tokenizer)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    for overwrite in (False, True):  # a folder export did not write is never replaced
        with pytest.raises(ConfigError, match="a folder that `lmtrain export` did not write"):
            export_hf(trained.model, trained.tokenizer, trained.path, out, overwrite=overwrite)
    assert (out / "mine.txt").read_text() == "keep me"
    (out / "mine.txt").unlink()
    export_hf(trained.model, trained.tokenizer, trained.path, out)
    with pytest.raises(ConfigError, match="already holds an export; choose another folder or add overwrite=true"):
        export_hf(trained.model, trained.tokenizer, trained.path, out)
    export_hf(trained.model, trained.tokenizer, trained.path, out, overwrite=True)
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]  # no temporary folder left
    for target in (trained.path, tmp_path, trained.path / "hf"):  # the checkpoint, a folder holding it, inside it
        with pytest.raises(ConfigError, match="would write into or over the checkpoint being exported"):
            export_hf(trained.model, trained.tokenizer, trained.path, target, overwrite=True)
    assert (trained.path / "model.safetensors").is_file()
