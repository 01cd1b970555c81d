"""Text from a trained model: prompts to token ids, the sampling loop with a KV cache, and streamed text.

Each step samples one token from the last position's logits: greedy (argmax) at temperature 0, else from
softmax(logits / temperature), kept to the top_k most likely tokens and to the smallest set whose
probability reaches top_p (nucleus sampling). With the cache, the prompt goes through the model once and
every later step is a forward of the one new token; without it, each step re-reads the whole sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import Tensor

from lmtrain.data.tokenizer import TextTokenizer
from lmtrain.errors import ConfigError
from lmtrain.model.gpt import GPT, KVCache

log = logging.getLogger(__name__)


def encode_prompt(tokenizer: TextTokenizer, text: str, key: str = "prompt") -> list[int]:
    """A prompt's token ids, after the begin-of-text token where the tokenizer has one (Llama's <s>); the empty
    prompt starts a new document (the begin-of-text token, else the end-of-text token).

    A tokenizer with an unknown-token (the char tokenizer) would silently turn characters it never saw
    into `<|unk|>`: that is refused, naming the characters and the config key.
    """
    if not text:
        return tokenizer.start_ids or [tokenizer.eot_id]
    ids = tokenizer.start_ids + tokenizer.encode(text)
    if tokenizer.unk_id is not None and tokenizer.unk_id in ids:
        unknown = sorted({ch for ch in text if tokenizer.encode(ch) == [tokenizer.unk_id]})
        what = f"the characters {unknown} are" if unknown else "part of it is"
        raise ConfigError(f"{key}={text!r}: {what} not in the tokenizer's vocabulary (a char tokenizer knows only "
                          "the characters of its training text)")
    return ids


def fit_context(ids: list[int], block_size: int) -> list[int]:
    """The prompt as it fits the context: one longer than block_size keeps its last block_size // 2 tokens,
    leaving the other half for new ones."""
    if len(ids) <= block_size:
        return ids
    keep = block_size // 2
    log.warning("The prompt has %d tokens, more than the model's context of %d (model.block_size): "
                "generating from its last %d tokens", len(ids), block_size, keep)
    return ids[-keep:]


def sample_next(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of logits (B, V): argmax at temperature 0, else a draw after top-k and top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    # Shifted so the largest is 0 before dividing: a tiny temperature then gives -inf, never inf - inf = nan.
    logits = (logits.float() - logits.float().amax(dim=-1, keepdim=True)) / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token once the more likely tokens before it already reach top_p; the first always stays
        sorted_probs[sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,); multinomial renormalizes


@torch.no_grad()
def generate_tokens(model: GPT, prompt: list[int], max_new_tokens: int, *, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, stop_id: int | None = None, n_tokens: int | None = None,
                    generator: torch.Generator | None = None, use_cache: bool = True,
                    banned: list[int] = ()) -> Iterator[int]:
    """Yield new token ids one by one, for a model in eval mode.

    Stops after max_new_tokens or after yielding stop_id (end-of-text). Past the model's context (block_size
    tokens read), the window slides: each further token is predicted from the last block_size tokens alone,
    read afresh at positions 0.. as in training (learned and rotary positions alike), so the model forgets
    what came before them, and each step costs a forward of the whole window instead of one cached position.
    n_tokens: ids at or above it (vocabulary padding the tokenizer cannot decode) are never drawn, nor are the
    ids in `banned` (padding, the unknown-token).
    """
    block = model.cfg.block_size
    if not 0 < len(prompt) <= block:
        raise ValueError(f"a prompt of {len(prompt)} tokens does not fit model.block_size={block}")
    device = model.tok_emb.weight.device
    seq = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T): everything so far
    idx = seq  # (1, T'): what the next forward reads
    cache = KVCache(model.cfg.n_layers) if use_cache else None
    for _ in range(max_new_tokens):
        if (cache.length if cache is not None else 0) + idx.size(1) > block:
            cache, idx = None, seq[:, -block:]  # the context is full: slide the window, uncached from here on
        logits = model(idx, cache=cache)[:, -1].float()  # (1, V): the next token's scores
        if n_tokens is not None:
            logits[:, n_tokens:] = float("-inf")
        logits[:, list(banned)] = float("-inf")
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (1,)
        yield int(token)
        if int(token) == stop_id:
            return
        seq = torch.cat([seq, token[:, None]], dim=1)
        idx = token[:, None] if cache is not None else seq[:, -block:]


class TextStream:
    """Turns generated ids, one at a time, into the text each adds (special tokens add none); a character
    split across tokens (byte-level BPE) is held back until it is complete."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence so far
            return ""
        new, self.shown = text[self.shown:], len(text)
        return new


def sample_texts(model: GPT, tokenizer: TextTokenizer, prompts: list[list[int]], max_new_tokens: int, seed: int,
                 temperature: float = 0.8, top_k: int = 50) -> list[str]:
    """Each encoded prompt and its continuation as text, drawn from a generator of its own (the global RNG,
    which drives dropout and data order, is left alone); the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    generator = torch.Generator(device).manual_seed(seed)
    texts = []
    for prompt in prompts:
        prompt = fit_context(prompt, model.cfg.block_size)
        new = list(generate_tokens(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                                   stop_id=tokenizer.eot_id, n_tokens=tokenizer.vocab_size, generator=generator,
                                   banned=tokenizer.never_generated))
        texts.append(tokenizer.decode(prompt + new, skip_special=True))
    model.train(was_training)
    return texts
