"""Evaluation: every token but the first is scored once, and bits per byte matches a case worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmtrain.config import ModelConfig
from lmtrain.data.tokenizer import TextTokenizer, train_bpe, train_char
from lmtrain.model import GPT
from lmtrain.model.evaluation import EvalResult, evaluate, evaluate_shards, first_tokens, text_bytes, windows


def test_windows_cover_every_token_but_the_first_once():
    assert windows(6, 2) == [(0, 2), (2, 2), (4, 1)]
    assert windows(5, 2) == [(0, 2), (2, 2)]
    for n, block in [(2, 4), (17, 4), (100, 7)]:
        scored = [s + 1 + i for s, length in windows(n, block) for i in range(length)]
        assert scored == list(range(1, n))


def fixed_distribution_model(probs: list[float]) -> GPT:
    """A model whose next-token distribution is `probs` whatever the context: the final norm's weight is zero,
    so every position's hidden state is its bias e_0, and the LM head's first column holds log(probs)."""
    model = GPT(ModelConfig(vocab_size=len(probs), d_model=8, n_heads=2, n_layers=1, d_ff=16, block_size=2,
                            tie_embeddings=False))
    with torch.no_grad():
        model.norm_f.weight.zero_()
        model.norm_f.bias.zero_()
        model.norm_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = torch.tensor(probs).log()
    return model.eval()


def test_bits_per_byte_on_a_case_worked_by_hand():
    # A char tokenizer of "aé€": ids 0-2 are <|endoftext|>, <|pad|>, <|unk|>; then a=3, é=4 (2 bytes), €=5 (3 bytes).
    tok = TextTokenizer(train_char(iter(["aé€"])))
    assert [tok.encode(c) for c in "aé€"] == [[3], [4], [5]]
    tokens = np.array(tok.encode("aé€") + [tok.eot_id] + tok.encode("€a"), dtype=np.uint16)  # [3, 4, 5, 0, 5, 3]
    # The model predicts p = (.1, .1, .1, .1, .2, .4) everywhere. Scored targets 4, 5, 0, 5, 3 (the first token
    # is only read) have p = .2, .4, .1, .4, .1: NLL = ln(1 / (.2 * .4 * .1 * .4 * .1)) = ln 3125 = 5 ln 5 nats.
    # Their text "é€" + "€a" is 2 + 3 + 0 + 3 + 1 = 9 bytes (end-of-text stands for none).
    # Bits per byte = 5 ln 5 / (9 ln 2) = 5 log2(5) / 9 = 1.28996...
    model = fixed_distribution_model([0.1, 0.1, 0.1, 0.1, 0.2, 0.4])
    result = evaluate(model, tok, tokens, batch_size=2)  # block 2: windows [3,4] [5,0] and a short [5]
    assert (result.tokens, result.bytes) == (5, 9)
    assert result.nll == pytest.approx(5 * math.log(5), rel=1e-6)
    assert result.bits_per_byte == pytest.approx(5 * math.log2(5) / 9, rel=1e-6)
    assert result.bits_per_byte == pytest.approx(1.2899600527, rel=1e-6)
    assert result.loss == pytest.approx(math.log(5))
    assert result.perplexity == pytest.approx(5.0)


def test_batching_does_not_change_the_result():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=1, d_ff=32, block_size=8)).eval()
    tokens = np.random.default_rng(0).integers(0, 50, size=203).astype(np.uint16)
    tok = TextTokenizer(train_char(iter(["xyz"])))
    nlls = [evaluate(model, tok, tokens, b).nll for b in (1, 3, 64)]
    assert nlls[0] == pytest.approx(nlls[1], rel=1e-6) and nlls[0] == pytest.approx(nlls[2], rel=1e-6)


def test_text_bytes_counts_utf8_bytes_across_pieces():
    texts = ["héllo wörld", "€uro ✓ done", "plain"]
    tok = TextTokenizer(train_bpe(iter(texts * 10), 280, 2))
    ids = []
    for t in texts:
        ids += tok.encode(t) + [tok.eot_id]
    expected = sum(len(t.encode("utf-8")) for t in texts)
    for piece in (1, 3, 1 << 16):  # cuts only fall after end-of-text, never inside a character
        assert text_bytes(tok, np.array(ids), piece=piece) == expected


def test_result_arithmetic():
    r = EvalResult(tokens=4, bytes=8, nll=4 * math.log(2))
    assert r.loss == pytest.approx(math.log(2)) and r.perplexity == pytest.approx(2.0)
    assert r.bits_per_byte == pytest.approx(0.5)


def test_shards_are_scored_each_on_their_own_and_summed():
    tokenizer = TextTokenizer(train_char(iter(["aé€"])))
    model = fixed_distribution_model([0.1, 0.1, 0.1, 0.3, 0.2, 0.2])
    a, b = np.array([3, 4, 5, 0, 3]), np.array([5, 5, 4, 0])
    both = evaluate_shards(model, tokenizer, [a, b], batch_size=2)
    one, other = evaluate(model, tokenizer, a, 2), evaluate(model, tokenizer, b, 2)
    assert both.tokens == 4 + 3 and both.bytes == one.bytes + other.bytes
    assert both.nll == pytest.approx(one.nll + other.nll)
    assert [len(s) for s in first_tokens([a, b], 5)] == [5, 2]  # 4 scored in a, then 1 in b
    assert [len(s) for s in first_tokens([a, b], 3)] == [4]
