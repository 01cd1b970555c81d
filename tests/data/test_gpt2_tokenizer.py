"""tokenizer=gpt2: GPT-2's byte-level BPE, shipped with lmtrain and read offline, with the ids GPT-2 has."""

from __future__ import annotations

import json

import pytest

from lmtrain.config import TokenizerConfig, TokenizerKind
from lmtrain.data.tokenizer import END_OF_TEXT, gpt2_tokenizer, tokenizer_fingerprint

from conftest import run_cli

TEXTS = ["Hello world", " Hello world", "The quick brown fox jumps over the lazy dog.", "  two  spaces\n\n\ttabs   ",
         "def f(x):\n    return x ** 2  # square\n\n\n", "naïve café, Straße, Ελληνικά, 日本語のテキスト, 한국어",
         "emoji 🎉🚀 and a family 👨‍👩‍👧 and flags 🇫🇷", f"one document{END_OF_TEXT}the next{END_OF_TEXT}",
         "it's they're we've I'm you'll he'd IT'S", "numbers 123456 3.14159 1e-9 0x7f", "\x00\x01 control \x7f\u200b",
         "   \n   ", "", "a" * 300, "<|endoftext", "https://example.com/a?b=c&d=e#f"]


def test_known_gpt2_facts_hold():
    """What GPT-2's tokenizer is known to do, independent of how lmtrain's file was made."""
    tok = gpt2_tokenizer()
    assert tok.vocab_size == 50257 and tok.eot_token == END_OF_TEXT and tok.eot_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Hello world") == [18435, 995]
    assert tok.encode(END_OF_TEXT) == [50256]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text  # byte-level: every text round-trips


def test_ids_are_those_of_transformers_gpt2_tokenizer_on_the_same_vocabulary(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = gpt2_tokenizer()
    model = json.loads(ours.tokenizer.to_str())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps({**model["vocab"], END_OF_TEXT: 50256}), encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    theirs = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    assert len(theirs) == 50257
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs(text)["input_ids"])


def test_the_fingerprint_names_the_shipped_file_and_not_the_data():
    cfg = TokenizerConfig(kind=TokenizerKind.gpt2)
    assert tokenizer_fingerprint(cfg, "data-a") == tokenizer_fingerprint(cfg, "data-b")
    assert tokenizer_fingerprint(cfg, "a") != tokenizer_fingerprint(TokenizerConfig(kind=TokenizerKind.char), "a")


def test_tokenizer_gpt2_trains_offline(tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", "tokenizer=gpt2", "model.n_layers=1", "model.d_model=32", "model.n_heads=2",
                     "model.d_ff=64", "model.block_size=16", "data.max_documents=20", "trainer.max_steps=2",
                     "trainer.batch_size=2", "trainer.eval_batches=1", "trainer.progress=false",
                     "trainer.sample_every=0", "trainer.precision=fp32", f"hydra.run.dir={run}",
                     env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "vocab 50,257" in result.stdout
    saved = json.loads((run / "checkpoints" / "final" / "tokenizer.json").read_text())
    assert saved["model"]["vocab"]["Hello"] == 15496
