"""Tokenizers: byte-level BPE or characters trained on the training split, a tokenizer.json, a hub tokenizer, or
GPT-2's own, shipped in lmtrain/data/gpt2/ (see its NOTICE.md; scripts/convert_gpt2_tokenizer.py makes it).

All are `tokenizers.Tokenizer` objects saved as tokenizer.json, so a checkpoint carries a tokenizer that
both lmtrain and Hugging Face's AutoTokenizer can read. Trained tokenizers are cached by a fingerprint
of the data and the settings, so they are trained once.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmtrain.config import TokenizerConfig, TokenizerKind
from lmtrain.errors import ConfigError, DataError

log = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
UNKNOWN = "<|unk|>"
GPT2_FILE = Path(__file__).resolve().parent / "gpt2" / "tokenizer.json.gz"  # tokenizer=gpt2
# Tokens that end a document, in order of preference, for tokenizers lmtrain did not train itself.
_EOT_CANDIDATES = (END_OF_TEXT, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the end-of-text id that separates documents, and the begin-of-text id that
    starts each one where the tokenizer itself puts one before every text (Llama's <s>)."""

    def __init__(self, tokenizer: Tokenizer, eot_token: str | None = None):
        self.tokenizer = tokenizer
        if eot_token is not None and tokenizer.token_to_id(eot_token) is None:
            raise DataError(f"tokenizer.eot_token={eot_token!r} is not a token of this tokenizer")
        eot = eot_token or next((t for t in _EOT_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
        if eot is None:
            raise DataError(f"the tokenizer has no end-of-text token; add one of {list(_EOT_CANDIDATES)}, or name "
                            "its own with tokenizer.eot_token")
        self.eot_token = eot
        self.eot_id: int = tokenizer.token_to_id(eot)
        self.unk_id: int | None = tokenizer.token_to_id(UNKNOWN)
        self.bos_id: int | None = added_bos(tokenizer)

    @property
    def start_ids(self) -> list[int]:
        """What every document starts with: the begin-of-text id, where the tokenizer adds one; else nothing."""
        return [] if self.bos_id is None else [self.bos_id]

    @property
    def never_generated(self) -> list[int]:
        """Ids a model must never draw: padding and the unknown-token stand for no text."""
        return [i for i in (self.tokenizer.token_to_id(PAD), self.unk_id) if i is not None]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips offset tracking, which tokenizing a corpus never needs.
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text for token ids; skip_special leaves out special tokens such as end-of-text."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        self.tokenizer.save(str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, eot_token: str | None = None) -> TextTokenizer:
        return cls(read_tokenizer(path), eot_token)


def read_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise DataError(f"cannot read tokenizer {path}: {e}") from None


def added_bos(tokenizer: Tokenizer) -> int | None:
    """The id a tokenizer's own post-processor puts before every text (Llama's <s>, Llama 3's <|begin_of_text|>);
    None for most (GPT-2, Qwen2, every tokenizer lmtrain trains)."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain]
    return full[0] if plain and starts and starts[0] == 1 else None


def tokenizer_settings(cfg: TokenizerConfig) -> dict:
    """What identifies a configured tokenizer, apart from the data a trained one learns from."""
    own = {} if cfg.eot_token is None else {"eot_token": cfg.eot_token}  # absent when unset: caches keep their keys
    if cfg.kind == TokenizerKind.file:
        return {"kind": "file", "sha256": hashlib.sha256(_read_file(cfg.path)).hexdigest(), **own}
    if cfg.kind == TokenizerKind.pretrained:
        return {"kind": "pretrained", "name": cfg.name, **own}
    if cfg.kind == TokenizerKind.gpt2:  # the shipped file's own bytes: a new lmtrain with new ids re-tokenizes
        return {"kind": "gpt2", "sha256": hashlib.sha256(GPT2_FILE.read_bytes()).hexdigest(), **own}
    if cfg.kind == TokenizerKind.char:  # learns every character of the training text: no settings
        return {"kind": "char", **own}
    return {"kind": "bpe", "vocab_size": cfg.vocab_size, "min_frequency": cfg.min_frequency,
            "train_documents": cfg.train_documents, **own}


def tokenizer_fingerprint(cfg: TokenizerConfig, data_fingerprint: str) -> str:
    """Trained tokenizers depend on the data; file and hub tokenizers only on what they name."""
    key = [tokenizer_settings(cfg)]
    if cfg.kind in (TokenizerKind.bpe, TokenizerKind.char):
        key.append(data_fingerprint)
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def same_tokenizer(a: TextTokenizer, b: TextTokenizer) -> bool:
    """Whether two tokenizers map text to the same ids (their whole definitions are equal) and end documents
    with the same token."""
    return a.tokenizer.to_str() == b.tokenizer.to_str() and a.eot_id == b.eot_id


def _read_file(path: str | None) -> bytes:
    p = Path(os.path.expanduser(path or ""))
    if not p.is_file():
        raise ConfigError(f"tokenizer.path={path!r}: no such file")
    return p.read_bytes()


def get_tokenizer(cfg: TokenizerConfig, fingerprint: str, cache_root: Path,
                  train_texts: Callable[[], Iterator[str]]) -> TextTokenizer:
    """The tokenizer from the cache, or built (trained on `train_texts()` if it must be) and cached."""
    path = cache_root / "tokenizers" / fingerprint / "tokenizer.json"
    if path.is_file():
        return TextTokenizer.load(path, cfg.eot_token)
    if cfg.kind == TokenizerKind.file:
        tokenizer = TextTokenizer.load(Path(os.path.expanduser(cfg.path)), cfg.eot_token)
    elif cfg.kind == TokenizerKind.pretrained:
        tokenizer = TextTokenizer(_from_hub(cfg.name), cfg.eot_token)
    elif cfg.kind == TokenizerKind.gpt2:
        tokenizer = gpt2_tokenizer(cfg.eot_token)
    elif cfg.kind == TokenizerKind.char:
        log.info("Collecting the characters of the training text for a char tokenizer")
        tokenizer = TextTokenizer(train_char(train_texts()), cfg.eot_token)
    else:
        log.info("Training a byte-level BPE tokenizer of %s tokens on up to %s documents", f"{cfg.vocab_size:,}",
                 "all" if cfg.train_documents is None else f"{cfg.train_documents:,}")
        tokenizer = TextTokenizer(train_bpe(train_texts(), cfg.vocab_size, cfg.min_frequency), cfg.eot_token)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(path)
    return tokenizer


def gpt2_tokenizer(eot_token: str | None = None) -> TextTokenizer:
    """GPT-2's byte-level BPE, from the file shipped with lmtrain: the ids of the hub's `gpt2` tokenizer."""
    return TextTokenizer(Tokenizer.from_str(gzip.decompress(GPT2_FILE.read_bytes()).decode("utf-8")), eot_token)


def _from_hub(name: str) -> Tokenizer:
    try:
        return Tokenizer.from_pretrained(name)
    except Exception as e:  # offline, unknown name, gated repo: the hub client raises several types
        raise ConfigError(
            f"tokenizer.name={name!r} could not be fetched from the Hugging Face hub ({str(e).splitlines()[0]}). "
            "Offline? Use tokenizer=file tokenizer.path=/path/to/tokenizer.json"
        ) from None


def train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    """Byte-level BPE as in GPT-2: any byte sequence encodes, nothing is unknown."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[END_OF_TEXT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def train_char(texts: Iterator[str]) -> Tokenizer:
    """One token per distinct character of the training text (nanoGPT's shakespeare_char), plus specials."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {tok: i for i, tok in enumerate([END_OF_TEXT, PAD, UNKNOWN] + sorted(chars))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # join characters without the spaces WordLevel would insert
    tokenizer.add_special_tokens([END_OF_TEXT, PAD])
    return tokenizer
