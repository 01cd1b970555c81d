"""Loss, perplexity and bits per byte of a model over a whole token split.

The split is read in consecutive windows of model.block_size tokens (the last one shorter), each
predicting its next tokens, so every token but the first is scored exactly once, as in training's
validation. Bits per byte divides the total loss by the UTF-8 bytes of exactly the scored tokens' text:
unlike a per-token loss it does not depend on how the tokenizer cuts text, so models with different
tokenizers compare. End-of-text tokens are scored (predicting where a document ends is part of the task)
but stand for no bytes of text.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lmtrain.data.tokenizer import TextTokenizer
from lmtrain.errors import DataError
from lmtrain.model import GPT


@dataclass
class EvalResult:
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of their text
    nll: float  # summed negative log-likelihood, in nats

    @property
    def loss(self) -> float:
        """Mean cross-entropy per token, in nats."""
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))  # capped: exp overflows a float past ~709

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * self.bytes) if self.bytes else math.nan


def windows(n_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """(start, length) of each window: it reads tokens[start:start+length] and predicts the tokens one further."""
    return [(s, min(block_size, n_tokens - 1 - s)) for s in range(0, n_tokens - 1, block_size)]


@torch.no_grad()
def total_nll(model: GPT, tokens: np.ndarray, batch_size: int, autocast: Callable = contextlib.nullcontext,
              on_batch: Callable[[int], None] | None = None) -> float:
    """Summed cross-entropy (nats) of tokens[1:], each predicted from the tokens before it in its window.

    on_batch(windows_done) reports progress.
    """
    device, block = model.tok_emb.weight.device, model.cfg.block_size
    spans = windows(len(tokens), block)
    full = [s for s, length in spans if length == block]
    # full windows go through the model batch_size at a time; a shorter last window goes alone
    groups = [[(s, block) for s in full[i:i + batch_size]] for i in range(0, len(full), batch_size)]
    groups += [[spans[-1]]] if spans[-1][1] < block else []
    total = torch.zeros((), dtype=torch.float64, device=device)
    for group in groups:
        offsets = np.array([s for s, _ in group])[:, None] + np.arange(group[0][1] + 1)  # (B, length + 1)
        window = torch.from_numpy(tokens[offsets].astype(np.int64)).to(device)
        x, y = window[:, :-1], window[:, 1:]
        with autocast():
            logits = model(x)  # (B, length, V)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").double()
        if on_batch is not None:
            on_batch(len(group))
    return total.item()


def text_bytes(tokenizer: TextTokenizer, ids: np.ndarray, piece: int = 1 << 16) -> int:
    """UTF-8 bytes of the text that token ids stand for; special tokens stand for none.

    Decoded in pieces of about `piece` tokens, each cut just after an end-of-text token: a document
    boundary, where no character can be split between two tokens.
    """
    cuts = np.flatnonzero(np.asarray(ids) == tokenizer.eot_id) + 1
    total, start = 0, 0
    while start < len(ids):
        i = np.searchsorted(cuts, start + piece)
        stop = int(cuts[i]) if i < len(cuts) else len(ids)
        total += len(tokenizer.decode(ids[start:stop].tolist(), skip_special=True).encode("utf-8"))
        start = stop
    return total


def check_no_unknown(tokenizer: TextTokenizer, shards: list[np.ndarray], texts: Callable[[], Iterable[str]],
                     where: str) -> None:
    """Refuse to score text with characters the tokenizer never saw: as <|unk|> they would make the loss and
    bits per byte meaningless. `texts()` yields the source's documents, read only to name the characters."""
    if tokenizer.unk_id is None:
        return
    count = sum(int(np.count_nonzero(np.asarray(s) == tokenizer.unk_id)) for s in shards)
    if count == 0:
        return
    vocab = tokenizer.tokenizer.get_vocab()
    unknown = sorted({ch for text in texts() for ch in set(text) if ch not in vocab})
    listing = f"the characters {unknown[:30]}{' ...' if len(unknown) > 30 else ''}" if unknown else "characters"
    raise DataError(f"{where}: {count:,} of its tokens would be <|unk|>: {listing} are not in the checkpoint's "
                    "tokenizer (a char tokenizer knows only the characters of its training text); evaluate on text "
                    "without them")


def first_tokens(shards: list[np.ndarray], max_scored: int | None) -> list[np.ndarray]:
    """The shards cut so that at most max_scored tokens are scored (a shard's first token is only read)."""
    if max_scored is None:
        return shards
    out = []
    for shard in shards:
        if max_scored <= 0:
            break
        out.append(shard[: max_scored + 1])
        max_scored -= len(out[-1]) - 1
    return out


def evaluate_shards(model: GPT, tokenizer: TextTokenizer, shards: list[np.ndarray], batch_size: int,
                    autocast: Callable = contextlib.nullcontext,
                    on_batch: Callable[[int], None] | None = None) -> EvalResult:
    """`evaluate` over each shard of a split, summed: windows never cross a shard, as in training."""
    parts = [evaluate(model, tokenizer, s, batch_size, autocast, on_batch) for s in shards if len(s) >= 2]
    return EvalResult(tokens=sum(p.tokens for p in parts), bytes=sum(p.bytes for p in parts),
                      nll=sum(p.nll for p in parts))


def evaluate(model: GPT, tokenizer: TextTokenizer, tokens: np.ndarray, batch_size: int,
             autocast: Callable = contextlib.nullcontext, on_batch: Callable[[int], None] | None = None) -> EvalResult:
    """Score every token of `tokens` but the first; see the module's docstring."""
    if len(tokens) < 2:
        raise ValueError("evaluation needs at least two tokens")
    nll = total_nll(model, tokens, batch_size, autocast, on_batch)
    return EvalResult(tokens=len(tokens) - 1, bytes=text_bytes(tokenizer, np.asarray(tokens[1:])), nll=nll)
