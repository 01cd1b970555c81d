"""Using a model safely: generation never emits <|unk|> or <|pad|>, any temperature samples, a NaN checkpoint
is refused, and evaluation refuses characters its tokenizer never saw instead of scoring <|unk|>."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmtrain.config import ModelConfig, as_plain_dict
from lmtrain.data.tokenizer import PAD, UNKNOWN, TextTokenizer, train_char
from lmtrain.errors import CheckpointError, DataError
from lmtrain.model import GPT
from lmtrain.model.evaluation import check_no_unknown, text_bytes
from lmtrain.model.generation import generate_tokens, sample_next
from lmtrain.model.weights import model_tensors
from lmtrain.runs.trained import load_trained


def char_tokenizer() -> TextTokenizer:
    return TextTokenizer(train_char(iter(["abc def\n"])))


def model_preferring(tokenizer: TextTokenizer, scores: dict[int, float]) -> GPT:
    """A model whose next-token scores are `scores` (0 for the rest), whatever it reads: the final norm
    outputs ones, and each head row sums to its token's score."""
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=8, n_heads=2, n_layers=1, d_ff=16,
                            block_size=16, tie_embeddings=False))
    with torch.no_grad():
        model.norm_f.weight.zero_()
        model.norm_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        for token, score in scores.items():
            model.lm_head.weight[token] = score / 8
    return model.eval()


def test_generation_never_draws_unknown_or_padding():
    tok = char_tokenizer()
    unk, pad, a = tok.unk_id, tok.tokenizer.token_to_id(PAD), tok.encode("a")[0]
    assert set(tok.never_generated) == {unk, pad}
    model = model_preferring(tok, {unk: 10.0, pad: 9.0, a: 1.0})
    greedy = list(generate_tokens(model, [a], 5, temperature=0, banned=tok.never_generated))
    assert greedy == [a] * 5
    drawn = list(generate_tokens(model, [a], 30, temperature=1.0, banned=tok.never_generated,
                                 generator=torch.Generator().manual_seed(0)))
    assert unk not in drawn and pad not in drawn


def test_a_tiny_temperature_samples_the_most_likely_token():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert sample_next(logits, 1e-40).tolist() == [1]


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    from lmtrain.files import write_folder

    tok = char_tokenizer()
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, d_model=8, n_heads=2, n_layers=1, d_ff=16, block_size=16))
    with torch.no_grad():
        model.tok_emb.weight[0, 0] = float("nan")

    def write(folder):  # as an older lmtrain wrote a diverged run's checkpoint
        import json

        from safetensors.torch import save_file

        save_file(model_tensors(model), str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model": as_plain_dict(model.cfg)}))
        tok.save(folder / "tokenizer.json")

    write_folder(tmp_path / "ckpt", write)
    with pytest.raises(CheckpointError, match="holds non-finite weights .*use an earlier checkpoint"):
        load_trained(tmp_path / "ckpt", torch.device("cpu"))


def test_evaluation_refuses_unknown_characters_and_counts_real_bytes():
    tok = char_tokenizer()
    text = "abc déf€"
    ids = np.array(tok.encode(text) + [tok.eot_id])
    with pytest.raises(DataError, match=r"the val split: 2 of its tokens would be <\|unk\|>: the characters "
                                        r"\['é', '€'\] are not in the checkpoint's tokenizer"):
        check_no_unknown(tok, [ids], lambda: iter([text]), "the val split")
    known = np.array(tok.encode("abc def") + [tok.eot_id])
    check_no_unknown(tok, [known], lambda: iter([]), "the val split")
    assert text_bytes(tok, known) == len(b"abc def") and UNKNOWN not in tok.decode(known, skip_special=True)
