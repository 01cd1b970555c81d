"""Generation: the KV cache computes what the full forward does, sampling obeys temperature, top-k and top-p,
and prompts are checked, fitted to the context and streamed as text."""

from __future__ import annotations

import pytest
import torch

from lmtrain.config import ModelConfig
from lmtrain.data.tokenizer import TextTokenizer, train_bpe, train_char
from lmtrain.errors import ConfigError
from lmtrain.model import GPT
from lmtrain.model.generation import TextStream, encode_prompt, fit_context, generate_tokens, sample_next, sample_texts
from lmtrain.model.gpt import KVCache

VOCAB = 64
GPT_ARCH = dict()
LLAMA_ARCH = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, bias=False, tie_embeddings=False)
QK_NORM_ARCH = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True)
ARCHS = {"gpt": GPT_ARCH, "llama-gqa": LLAMA_ARCH, "rope-qknorm": QK_NORM_ARCH}


def spiky_model(arch: dict, block_size: int = 24) -> GPT:
    """A tiny random model with large weights, so greedy decoding wanders over many tokens instead of
    repeating one (a repeated token would hide a cache that attends to the wrong positions)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, d_ff=64, block_size=block_size,
                            **arch))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
def test_cached_forward_gives_the_full_forwards_logits(arch):
    model = spiky_model(arch)
    idx = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        full = model(idx)  # (2, 20, V)
        cache = KVCache(model.cfg.n_layers)
        pieces = [model(idx[:, :7], cache=cache)]  # a prompt of 7, then one token at a time, then 3 at once
        pieces += [model(idx[:, t:t + 1], cache=cache) for t in range(7, 17)]
        pieces.append(model(idx[:, 17:20], cache=cache))
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
def test_greedy_generation_with_the_cache_matches_generation_without_it(arch):
    model = spiky_model(arch)
    prompt = [5, 17, 33, 2]
    with_cache = list(generate_tokens(model, prompt, 100, temperature=0))
    without = list(generate_tokens(model, prompt, 100, temperature=0, use_cache=False))
    assert with_cache == without
    assert len(with_cache) == 100  # past the context limit of 24 the window slides
    assert len(set(with_cache)) > 5  # a varied sequence, so the comparison means something


@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
def test_past_the_context_each_token_is_predicted_from_the_last_block_size_tokens(arch):
    model = spiky_model(arch, block_size=8)
    prompt = [5, 17, 33, 2, 9, 40]
    drawn = list(generate_tokens(model, prompt, 20, temperature=0))
    seq = list(prompt)
    with torch.no_grad():
        for token in drawn:  # the reference: nanoGPT's loop, a full forward of the last 8 tokens each step
            assert token == int(model(torch.tensor([seq[-8:]]))[0, -1].argmax())
            seq.append(token)
    assert len(drawn) == 20


def test_generation_stops_after_the_stop_token_and_at_max_new_tokens():
    model = spiky_model(GPT_ARCH)
    greedy = list(generate_tokens(model, [1, 2, 3], 10, temperature=0))
    assert len(greedy) == 10
    stop = greedy[4]
    first = greedy.index(stop)
    assert list(generate_tokens(model, [1, 2, 3], 10, temperature=0, stop_id=stop)) == greedy[:first + 1]


def test_a_prompt_longer_than_the_context_is_refused_by_the_loop():
    with pytest.raises(ValueError, match="block_size=24"):
        next(generate_tokens(spiky_model(GPT_ARCH), list(range(25)), 5))


def test_temperature_zero_is_argmax_and_top_k_1_or_a_tiny_top_p_is_too():
    logits = torch.tensor([[0.1, 3.0, 0.5, 2.9], [4.0, 0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.0).tolist() == [1, 0]
    for _ in range(20):
        assert sample_next(logits, 1.0, top_k=1, generator=g).tolist() == [1, 0]
        assert sample_next(logits, 5.0, top_p=1e-6, generator=g).tolist() == [1, 0]


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    top2 = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(300)}
    assert top2 == {0, 1}
    # the nucleus for 0.7 is {0, 1}: 0.5 alone falls short, 0.5 + 0.3 reaches it
    nucleus = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(300)}
    assert nucleus == {0, 1}
    everything = {int(sample_next(logits, 1.0, generator=g)) for _ in range(1000)}
    assert everything == {0, 1, 2, 3}


def test_sampling_follows_the_distribution_and_the_seed():
    logits = torch.tensor([[0.0, 0.0, 2.0]])  # p = 1/(2 + e^2) for each of the first two, 0.787 for the last
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([sample_next(logits, 1.0, generator=g) for _ in range(2000)])
    assert (draws == 2).float().mean().item() == pytest.approx(0.787, abs=0.03)
    hot = torch.stack([sample_next(logits, 100.0, generator=g) for _ in range(2000)])  # nearly uniform
    assert (hot == 2).float().mean().item() == pytest.approx(1 / 3, abs=0.04)
    model = spiky_model(GPT_ARCH)
    runs = [list(generate_tokens(model, [1], 15, generator=torch.Generator().manual_seed(s))) for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]


def test_padding_ids_beyond_the_tokenizer_are_never_drawn():
    model = spiky_model(GPT_ARCH)
    g = torch.Generator().manual_seed(0)
    drawn = list(generate_tokens(model, [1], 20, temperature=3.0, n_tokens=10, generator=g))
    assert drawn and max(drawn) < 10


def test_unknown_characters_of_a_char_tokenizer_are_named():
    tok = TextTokenizer(train_char(iter(["def main():\n    pass\n"])))
    assert tok.decode(encode_prompt(tok, "def pass")) == "def pass"
    assert encode_prompt(tok, "") == [tok.eot_id]  # the empty prompt starts a document
    with pytest.raises(ConfigError, match=r"prompt='défi €': the characters \['é', '€'\] are not in the tokenizer"):
        encode_prompt(tok, "défi €")


def test_a_prompt_longer_than_the_context_keeps_its_last_half_context(caplog):
    assert fit_context([1, 2, 3], 4) == [1, 2, 3]
    assert fit_context(list(range(10)), 4) == [8, 9]
    assert "more than the model's context of 4 (model.block_size): generating from its last 2" in caplog.text


def test_text_stream_holds_back_a_character_split_across_byte_tokens():
    tok = TextTokenizer(train_bpe(iter(["plain ascii text only"] * 20), 270, 2))
    ids = tok.encode("a€b")  # '€' is three bytes: no merge covers it, so three tokens
    assert len(ids) == 5
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids + [tok.eot_id]]
    assert pieces == ["a", "", "", "€", "b", ""]


def test_training_samples_leave_the_model_mode_and_the_global_rng_alone():
    tok = TextTokenizer(train_char(iter(["abcdef "])))
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_heads=2, n_layers=1, d_ff=32, block_size=8))
    model.train()
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    texts = sample_texts(model, tok, [encode_prompt(tok, "ab"), encode_prompt(tok, "")], 5, seed=0)
    assert torch.rand(1) == expected and model.training
    assert texts[0].startswith("ab") and len(texts) == 2 and "<|endoftext|>" not in texts[1]
    assert texts == sample_texts(model, tok, [encode_prompt(tok, "ab"), encode_prompt(tok, "")], 5, seed=0)
