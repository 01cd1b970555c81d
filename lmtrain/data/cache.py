"""The token cache: each split of a source tokenized once into shard files, read back with np.memmap.

Layout of `<cache_dir>/data/<key>/`, where the key covers the source, the tokenizer and the token limit:
  tokenizer.json           the tokenizer that made the ids (written first)
  train-00000.bin, ...     flat token ids (uint16, or uint32 above 65,536 tokens), each document closed by
  val-00000.bin, ...       end-of-text; a shard is closed once it holds SHARD_TOKENS, and a new one begun
  progress.json            while building: the shards finished so far and the documents they used
  manifest.json            written last: it, and only it, marks the cache complete; it records each shard's
                           size and SHA-256, and a checksum of itself
  verified.json            each shard's size and modification time when its content was last verified

A crash mid-way leaves no manifest, so nothing ever takes the folder for complete. The next run keeps
the finished shards, overwrites the unfinished one and goes on from the document where progress.json
says the last finished shard ended: a terabyte preparation interrupted at 90% does not start over. A
lock file makes a second process wait for the first instead of building the same cache twice.

Every open checks the manifest's checksum and the shards' sizes. A shard is read whole when it is first opened
after it changed (a new size or modification time), or with `lmtrain prepare verify=true`: its SHA-256 must be
the manifest's, and its largest token id below the vocabulary, so a damaged shard is found before any batch
reaches the model (and rebuilt). A cache made before shards had checksums gets them at its first open, once its
ids are checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from filelock import FileLock

from lmtrain.config import SourceConfig, as_plain_dict
from lmtrain.data.sources import Splits
from lmtrain.data.tokenizer import TextTokenizer
from lmtrain.errors import DataError
from lmtrain.files import write_json

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the on-disk layout changes, so old caches are not misread
BATCH_DOCUMENTS = 128  # documents read at a time; the unit of resuming
TOKENIZE_CHARS = 1_000_000  # text handed to the tokenizer at once (its threads share it): bounds memory
SHARD_TOKENS = 100_000_000  # a shard is closed at the first batch boundary past this many tokens
MANIFEST, PROGRESS, TOKENIZER, VERIFIED = "manifest.json", "progress.json", "tokenizer.json", "verified.json"
READ_BYTES = 16 << 20  # a shard is verified this many bytes at a time


@dataclass
class Progress:
    """How far the tokenization of one split has come, for a progress bar."""

    source: str
    split: str
    documents: int
    tokens: int
    total_documents: int | None  # None: not known in advance (a streaming source)
    max_tokens: int | None  # the split's token limit, if any


@dataclass
class TokenCache:
    path: Path
    manifest: dict
    tokenizer: TextTokenizer

    def shards(self, split: str) -> list[np.memmap]:
        """A split's token ids, one lazily read array per shard (a range of one, for a held-out tail)."""
        dtype = np.dtype(self.manifest["dtype"])
        return [np.memmap(self.path / s["file"], dtype=dtype, mode="r", offset=s["start"] * dtype.itemsize,
                          shape=(s["tokens"],)) for s in self.manifest["splits"][split]["shards"]]

    def num_tokens(self, split: str) -> int:
        return self.manifest["splits"][split]["tokens"]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class DamagedCache(DataError):
    """A cache folder whose manifest, shards or tokenizer do not agree: truncated, deleted or corrupt."""


def _checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _damage(folder: Path, manifest: dict) -> str | None:
    """What is wrong with a complete cache's manifest and shards, checked on every open: the manifest's checksum,
    then each shard's size against the manifest (exact where it recorded the sizes); None when all is well."""
    if "checksum" in manifest and manifest["checksum"] != _checksum(manifest):
        return f"{MANIFEST} does not match its checksum"
    itemsize = np.dtype(manifest["dtype"]).itemsize
    sizes = manifest.get("files", {})
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            file = folder / shard["file"]
            if not file.is_file():
                return f"{shard['file']} is missing"
            size, recorded = file.stat().st_size, sizes.get(shard["file"])
            if recorded is not None and size != recorded:
                return f"{shard['file']} has {size:,} bytes where {MANIFEST} records {recorded:,}"
            if size < (shard["start"] + shard["tokens"]) * itemsize:
                return f"{shard['file']} is truncated ({size:,} bytes)"
    return None


def open_cache(folder: Path, verify_all: bool = False) -> TokenCache | None:
    """The complete cache in `folder`, or None when there is none (or only an unfinished one, or one of an
    older format). A damaged one raises DamagedCache, saying what is wrong. Shards are verified by content
    (see the module's docstring) when they changed since their last verification, or all with `verify_all`."""
    if not (folder / MANIFEST).is_file():
        return None
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedCache(f"{folder}: {MANIFEST} is corrupt ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        return None
    try:
        problem = _damage(folder, manifest)
        if problem is not None:
            raise DamagedCache(f"{folder}: {problem}")
        manifest = _verify_shards(folder, manifest, verify_all)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # edited by hand: a field missing or mistyped
        raise DamagedCache(f"{folder}: {MANIFEST} is not a manifest lmtrain wrote ({type(e).__name__}: {e})") from None
    try:
        tokenizer = TextTokenizer.load(folder / TOKENIZER, manifest["tokenizer"].get("eot_token"))
    except Exception as e:  # the tokenizers library raises its own exception types
        raise DamagedCache(f"{folder}: {TOKENIZER} cannot be read "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return TokenCache(folder, manifest, tokenizer)


def shard_digest(file: Path, dtype: np.dtype, vocab_size: int) -> str:
    """A shard's SHA-256, read in pieces; a token id outside the vocabulary raises DamagedCache on the way."""
    sha = hashlib.sha256()
    with open(file, "rb") as f:
        while piece := f.read(READ_BYTES - READ_BYTES % dtype.itemsize):
            sha.update(piece)
            ids = np.frombuffer(piece, dtype=dtype)
            if ids.size and int(ids.max()) >= vocab_size:
                raise DamagedCache(f"{file.parent}: {file.name} holds token id {int(ids.max()):,}, outside the "
                                   f"vocabulary of {vocab_size:,}")
    return sha.hexdigest()


def _stamp(file: Path) -> list[int]:
    info = file.stat()
    return [info.st_size, info.st_mtime_ns]


def _verify_shards(folder: Path, manifest: dict, verify_all: bool) -> dict:
    """Check by content each shard not verified since it last changed (all of them with `verify_all`), then
    record their stamps; a cache from before checksums gets them now. Returns the manifest, with checksums."""
    try:
        verified = json.loads((folder / VERIFIED).read_text()) if (folder / VERIFIED).is_file() else {}
    except (OSError, ValueError):
        verified = {}  # a damaged record of verifications only means verifying again
    verified = verified if isinstance(verified, dict) else {}
    dtype, vocab = np.dtype(manifest["dtype"]), manifest["vocab_size"]
    checksums = manifest.get("checksums")
    files = sorted({s["file"] for split in manifest["splits"].values() for s in split["shards"]})
    fresh, digests = {}, {}
    for name in files:
        fresh[name] = _stamp(folder / name)
        if verify_all or checksums is None or verified.get(name) != fresh[name]:
            digests[name] = shard_digest(folder / name, dtype, vocab)
            if checksums is not None and checksums.get(name) != digests[name]:
                raise DamagedCache(f"{folder}: {name} does not match the checksum {MANIFEST} records (its content "
                                   "changed after it was written)")
    if verify_all:
        log.info("Verified the %d shards of %s: their checksums and token ids are as written", len(files), folder)
    try:
        if checksums is None:  # made by an older lmtrain: its ids are in range, so its content is taken as it is
            body = {k: v for k, v in manifest.items() if k != "checksum"}
            manifest = {**body, "checksums": digests, "checksum": _checksum({**body, "checksums": digests})}
            write_json(folder / MANIFEST, manifest)
            log.info("Recorded the checksums of the shards of %s (a cache made by an older lmtrain)", folder)
        if fresh != verified:
            write_json(folder / VERIFIED, fresh)
    except OSError as e:  # a read-only cache (data.source=prepared): verified again at each open
        log.debug("Could not record the verification of %s: %s", folder, e)
    return manifest


def _clear(folder: Path) -> None:
    """Empty a cache folder for a rebuild, keeping its lock file (held by this process)."""
    for entry in folder.iterdir():
        if entry.name != ".lock":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def build_cache(folder: Path, source: SourceConfig, key: str, load: Callable[[], Splits],
                tokenizer: Callable[[], TextTokenizer], tokenizer_record: dict,
                on_progress: Callable[[Progress], None] | None = None, verify_all: bool = False) -> TokenCache:
    """Tokenize a source's splits into `folder` (resuming an interrupted build), unless it is complete already
    (its shards verified as `open_cache` does).

    `key` is where the source sits in the config (data, or data.mixture.N), for error messages.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / ".lock"):
        try:
            done = open_cache(folder, verify_all)  # another process may have finished it while we waited
        except DamagedCache as e:
            log.warning("The token cache is damaged (%s); rebuilding it", e)
            _clear(folder)
            done = None
        if done is not None:
            return done
        splits = load()
        if (folder / TOKENIZER).is_file():  # an interrupted build: its shards hold this tokenizer's ids
            tok = TextTokenizer.load(folder / TOKENIZER, tokenizer_record.get("eot_token"))
        else:
            tok = tokenizer()
            tok.save(folder / TOKENIZER)
        try:
            progress = _read_json(folder / PROGRESS) or {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s is corrupt; tokenizing %s from the start", folder / PROGRESS, source.name)
            progress = {}
        log.info("%s %s into %s", "Resuming the tokenization of" if progress else "Tokenizing", source.name, folder)
        dtype = token_dtype(tok.vocab_size)
        stats = {}
        cap = source.max_tokens
        limits = {"train": cap, "val": None if cap is None else max(1, round(cap * source.val_fraction))}
        report = on_progress or (lambda p: None)
        for split, ds in [("train", splits.train), ("val", splits.val)]:
            if ds is None:
                continue
            total = len(ds) if hasattr(ds, "__len__") else None  # a stream has no length
            writer = _SplitWriter(folder, split, dtype, progress, limits[split])
            stats[split] = writer.run(ds, splits.text_column, tok, lambda d, t, s=split, n=total: report(
                Progress(source.name, s, d, t, n, limits[s])))
            if stats[split]["tokens"] <= 1:
                raise DataError(f"{key}: the {split} split has no text "
                                f"({stats[split]['documents']:,} non-empty documents)")
        if splits.val is None:  # one long text (or a few): the last val_fraction of its tokens validate
            stats["train"], stats["val"] = _split_tail(stats["train"], source.val_fraction)
        source_record = {k: v for k, v in as_plain_dict(source).items() if k != "weight"}  # weights: not the data
        shards = sorted(folder.glob("*.bin"))
        manifest = {"format": CACHE_FORMAT, "dtype": dtype.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                    "source": source_record, "tokenizer": tokenizer_record, "splits": stats,
                    "files": {f.name: f.stat().st_size for f in shards},
                    "checksums": {f.name: shard_digest(f, dtype, tok.vocab_size) for f in shards}}
        write_json(folder / VERIFIED, {f.name: _stamp(f) for f in shards})  # verified as they were hashed
        write_json(folder / MANIFEST, {**manifest, "checksum": _checksum(manifest)})
        (folder / PROGRESS).unlink(missing_ok=True)
    return open_cache(folder)


@dataclass
class _SplitWriter:
    """Appends a split's tokens to shard files; after each finished shard, records how far it got."""

    folder: Path
    split: str
    dtype: np.dtype
    progress: dict  # progress.json's content, shared by the splits; updated in place
    max_tokens: int | None
    state: dict = field(init=False)

    def __post_init__(self):
        fresh = {"shards": [], "records": 0, "documents": 0, "tokens": 0, "text_bytes": 0, "seconds": 0.0,
                 "done": False}
        self.state = self.progress.setdefault(self.split, fresh)

    def run(self, ds, column: str, tok: TextTokenizer, on_progress: Callable[[int, int], None]) -> dict:
        s = self.state
        if not s["done"]:
            kept = {shard["file"] for shard in s["shards"]}
            for stale in self.folder.glob(f"{self.split}-*.bin"):  # the unfinished shard of a crashed run
                if stale.name not in kept:
                    stale.unlink()
            self._tokenize(ds.skip(s["records"]) if s["records"] else ds, column, tok, on_progress)
        return {k: s[k] for k in ("shards", "documents", "tokens", "text_bytes", "seconds")}

    def _tokenize(self, ds, column: str, tok: TextTokenizer, on_progress: Callable[[int, int], None]) -> None:
        s, start = self.state, time.perf_counter()
        pending = {"records": 0, "documents": 0, "tokens": 0, "text_bytes": 0}  # of the shard being written
        out = None
        on_progress(s["documents"], s["tokens"])
        for batch in ds.iter(batch_size=BATCH_DOCUMENTS):
            records = batch[column]
            ends = [not c for c in batch["_continues"]] if "_continues" in batch else [True] * len(records)
            texts, ends = [t for t in records if t], [e for t, e in zip(records, ends, strict=True) if t]
            flat = _encode_documents(texts, ends, tok, self.dtype)
            if s["tokens"] + pending["tokens"] == 0:  # the split's first document starts, as every later one
                flat = np.concatenate([np.asarray(tok.start_ids, dtype=self.dtype), flat])
            if self.max_tokens is not None:
                flat = flat[: self.max_tokens - s["tokens"] - pending["tokens"]]
            if out is None:
                out = open(self.folder / f"{self.split}-{len(s['shards']):05d}.bin", "wb")
            out.write(flat.tobytes())
            for key, value in [("records", len(records)), ("documents", sum(ends)), ("tokens", len(flat)),
                               ("text_bytes", sum(len(t.encode("utf-8")) for t in texts))]:
                pending[key] += value
            on_progress(s["documents"] + pending["documents"], s["tokens"] + pending["tokens"])
            full = self.max_tokens is not None and s["tokens"] + pending["tokens"] >= self.max_tokens
            if pending["tokens"] >= SHARD_TOKENS or full:
                self._finish_shard(out, pending, start)
                out, pending, start = None, dict.fromkeys(pending, 0), time.perf_counter()
            if full:
                break
        if out is not None:
            self._finish_shard(out, pending, start)
        s["done"] = True
        write_json(self.folder / PROGRESS, self.progress)

    def _finish_shard(self, out, pending: dict, start: float) -> None:
        """Make the shard durable, then record it: a crash between the two only costs redoing this shard."""
        out.flush()
        os.fsync(out.fileno())
        out.close()
        s = self.state
        name = Path(out.name).name
        if pending["tokens"]:
            s["shards"].append({"file": name, "start": 0, "tokens": pending["tokens"]})
        else:
            os.unlink(out.name)  # np.memmap cannot map an empty file
        for key in pending:
            s[key] += pending[key]
        s["seconds"] = round(s["seconds"] + time.perf_counter() - start, 3)
        write_json(self.folder / PROGRESS, self.progress)


def _encode_documents(texts: list[str], ends: list[bool], tok: TextTokenizer, dtype: np.dtype) -> np.ndarray:
    """The texts' ids, end-of-text after each that ends a document (a long file comes as several pieces), then
    the next document's begin-of-text where the tokenizer has one (Llama's `</s><s>`). The tokenizer sees at
    most TOKENIZE_CHARS of text at a time (or one longer text): its per-token Encoding objects, not the text,
    are what takes memory."""
    eot = np.array([tok.eot_id, *tok.start_ids], dtype=dtype)
    pieces, start, chars = [eot[:0]], 0, 0
    for end, text in enumerate(texts, 1):
        chars += len(text)
        if chars >= TOKENIZE_CHARS or end == len(texts):
            for ids, last in zip(tok.encode_batch(texts[start:end]), ends[start:end], strict=True):
                pieces += [np.asarray(ids, dtype=dtype), eot] if last else [np.asarray(ids, dtype=dtype)]
            start, chars = end, 0
    return np.concatenate(pieces)


def _split_tail(train: dict, val_fraction: float) -> tuple[dict, dict]:
    """Hold out the last val_fraction of the training tokens (nanoGPT's split of one long text).

    Nothing is copied: the manifest points validation at the tail ranges of the train shards.
    """
    n = train["tokens"]
    cut = n - max(1, int(n * val_fraction))
    train_shards, val_shards, offset = [], [], 0
    for shard in train["shards"]:
        keep = min(shard["tokens"], max(0, cut - offset))
        if keep:
            train_shards.append({**shard, "tokens": keep})
        if keep < shard["tokens"]:
            val_shards.append({**shard, "start": shard["start"] + keep, "tokens": shard["tokens"] - keep})
        offset += shard["tokens"]
    share = cut / n  # documents and bytes are counted in proportion: the cut falls inside a document
    return ({**train, "shards": train_shards, "tokens": cut, "text_bytes": round(train["text_bytes"] * share)},
            {"shards": val_shards, "documents": 0, "tokens": n - cut, "seconds": 0.0,
             "text_bytes": round(train["text_bytes"] * (1 - share))})


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None
