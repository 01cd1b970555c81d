"""The token cache: each split tokenized once into a flat array on disk, read back with np.memmap.

Layout: `<cache_dir>/data/<fingerprint>/{train.bin, val.bin, tokenizer.json, manifest.json}`. The
fingerprint covers the source, the tokenizer and the token limit, so any change builds a new cache
and an unchanged config finds the old one. A cache is built in a temporary folder and renamed into
place with its manifest already inside: a crash mid-way never leaves a folder that looks complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmtrain.config import DataConfig, TokenizerConfig, TokenizerKind
from lmtrain.data.sources import Splits, load_splits, source_fingerprint
from lmtrain.data.tokenizer import TextTokenizer, get_tokenizer, tokenizer_fingerprint
from lmtrain.errors import DataError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the on-disk layout changes, so old caches are not misread
BATCH_DOCUMENTS = 1000  # documents handed to the tokenizer at once: its threads share the batch


@dataclass
class TokenCache:
    path: Path
    manifest: dict
    tokenizer: TextTokenizer

    def tokens(self, split: str) -> np.memmap:
        """A split's token ids, read lazily from disk."""
        return np.memmap(self.path / f"{split}.bin", dtype=np.dtype(self.manifest["dtype"]), mode="r")


def cache_root(cfg: DataConfig) -> Path:
    return Path(os.path.expanduser(cfg.cache_dir))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def prepare_tokens(data_cfg: DataConfig, tok_cfg: TokenizerConfig,
                   on_progress: Callable[[str, int, int], None] | None = None) -> TokenCache:
    """Find the token cache for this data and tokenizer, or build it. Loads nothing when it exists.

    on_progress(split, documents, tokens) is called as tokenization advances.
    """
    root = cache_root(data_cfg)
    data_fp = source_fingerprint(data_cfg)
    tok_fp = tokenizer_fingerprint(tok_cfg, data_fp)
    fingerprint = hashlib.sha256(json.dumps([CACHE_FORMAT, data_fp, tok_fp, data_cfg.max_tokens]).encode())
    final = root / "data" / fingerprint.hexdigest()[:16]
    if (final / "manifest.json").is_file():
        manifest = json.loads((final / "manifest.json").read_text())
        log.info("Using tokenized data from %s (%s train tokens)", final, f"{manifest['splits']['train']['tokens']:,}")
        return TokenCache(final, manifest, TextTokenizer.load(final / "tokenizer.json"))

    splits = load_splits(data_cfg)
    tokenizer = get_tokenizer(tok_cfg, tok_fp, root, lambda: _training_texts(splits, tok_cfg))
    log.info("Tokenizing %s with a %s tokenizer of %s tokens into %s",
             data_cfg.name, tok_cfg.kind.value, f"{tokenizer.vocab_size:,}", final)
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _build(tmp, splits, tokenizer, data_cfg, tok_cfg, on_progress)
        os.replace(tmp, final)
    except OSError:
        if not (final / "manifest.json").is_file():
            raise
        # another process finished the same cache first; theirs is as good as ours
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenCache(final, json.loads((final / "manifest.json").read_text()), TextTokenizer.load(
        final / "tokenizer.json"))


def _build(folder: Path, splits: Splits, tokenizer: TextTokenizer, data_cfg: DataConfig, tok_cfg: TokenizerConfig,
           on_progress: Callable[[str, int, int], None] | None) -> None:
    """Write each split's tokens, the tokenizer, and last the manifest that marks the cache complete."""
    dtype = token_dtype(tokenizer.vocab_size)
    start = time.perf_counter()
    stats = {}
    for split, ds in [("train", splits.train), ("val", splits.val)]:
        if ds is None:
            continue
        report = (lambda d, t, s=split: on_progress(s, d, t)) if on_progress else (lambda d, t: None)
        stats[split] = _write_split(ds, splits.text_column, tokenizer, dtype, folder / f"{split}.bin",
                                    data_cfg.max_tokens, report)
        if stats[split]["tokens"] <= 1:
            raise DataError(f"the {split} split of data={data_cfg.name} has no text to train on")
    if splits.val is None:  # one long text (or a few): the last val_fraction of its tokens validate
        stats["train"], stats["val"] = _split_tail(folder, dtype, data_cfg.val_fraction, stats["train"])
    tokenizer.save(folder / "tokenizer.json")
    manifest = {
        "format": CACHE_FORMAT, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
        "source": data_cfg.name, "tokenizer": tok_cfg.kind.value, "splits": stats,
        "seconds": round(time.perf_counter() - start, 2),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _training_texts(splits: Splits, cfg: TokenizerConfig) -> Iterator[str]:
    """Texts a trained tokenizer learns from: the first tokenizer.train_documents training documents."""
    column = splits.text_column
    texts = (row[column] for row in splits.train)
    if cfg.kind == TokenizerKind.char:  # every character must be seen, so read everything
        return texts
    return itertools.islice(texts, cfg.train_documents)


def _write_split(ds, column: str, tokenizer: TextTokenizer, dtype: np.dtype, path: Path,
                 max_tokens: int | None, on_progress: Callable[[int, int], None]) -> dict:
    """Tokenize batch by batch and append to one flat file: memory stays bounded by one batch."""
    documents = tokens = nbytes = 0
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    with open(path, "wb") as out:
        for batch in ds.iter(batch_size=BATCH_DOCUMENTS):
            texts = [t for t in batch[column] if t]
            pieces = []
            for ids in tokenizer.encode_batch(texts):
                pieces += [np.asarray(ids, dtype=dtype), eot]  # end-of-text closes every document
            flat = np.concatenate(pieces) if pieces else eot[:0]
            if max_tokens is not None and tokens + len(flat) > max_tokens:
                flat = flat[: max_tokens - tokens]
            out.write(flat.tobytes())
            documents += len(texts)
            tokens += len(flat)
            nbytes += sum(len(t.encode("utf-8")) for t in texts)
            on_progress(documents, tokens)
            if max_tokens is not None and tokens >= max_tokens:
                break
    return {"documents": documents, "tokens": tokens, "text_bytes": nbytes}


def _split_tail(folder: Path, dtype: np.dtype, val_fraction: float, train_stats: dict) -> tuple[dict, dict]:
    """Move the last val_fraction of train.bin's tokens into val.bin (nanoGPT's split of one long text)."""
    train_path = folder / "train.bin"
    n = train_stats["tokens"]
    cut = n - max(1, int(n * val_fraction))
    tail = np.fromfile(train_path, dtype=dtype, offset=cut * dtype.itemsize)
    tail.tofile(folder / "val.bin")
    with open(train_path, "r+b") as f:
        f.truncate(cut * dtype.itemsize)
    share = cut / n  # documents and bytes are counted in proportion: the cut falls inside a document
    return ({**train_stats, "tokens": cut, "text_bytes": round(train_stats["text_bytes"] * share)},
            {"documents": 0, "tokens": len(tail), "text_bytes": round(train_stats["text_bytes"] * (1 - share))})
