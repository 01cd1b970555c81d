"""A run's data: each source (one, or a mixture's several) tokenized into its own cache, with one tokenizer.

`prepare_data` is what `lmtrain prepare` and `lmtrain train` both call. It finds every cache by key
without reading any data; only a missing one loads its source and tokenizes it. A mixture's tokenizer
is trained on all its sources, and each source keeps its own cache, so changing the weights re-tokenizes
nothing. A `prepared` source is a cache folder given by path (e.g. copied from the machine that
prepared it); its tokenizer is then the run's tokenizer, and the run's tokenizer settings must match.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmtrain.config import DataConfig, SourceConfig, SourceKind, TokenizerConfig, TokenizerKind
from lmtrain.data.cache import CACHE_FORMAT, DamagedCache, Progress, TokenCache, build_cache, open_cache
from lmtrain.data.sources import Splits, columns_disagree, digest, load_splits, source_fingerprint
from lmtrain.data.tokenizer import (
    TextTokenizer,
    get_tokenizer,
    same_tokenizer,
    tokenizer_fingerprint,
    tokenizer_settings,
)
from lmtrain.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    tokenizer: TextTokenizer
    caches: dict[str, TokenCache]  # by source name, in config order
    weights: dict[str, float] | None  # a mixture's weights, summing to 1; None for a single source

    def fingerprint(self) -> str:
        """What a run trains on, as one short hash: the tokenizer, each cache's manifest (its shards, their sizes
        and checksums; not where the cache lives) and the mixture's weights. The ranks of a run compare it."""
        manifests = [{**c.manifest, "source": {k: v for k, v in c.manifest.get("source", {}).items()
                                               if k != "cache_dir"}} for c in self.caches.values()]  # node-local
        return digest([self.tokenizer.tokenizer.to_str(), manifests, self.weights])


def cache_root(cfg: DataConfig) -> Path:
    return Path(os.path.expanduser(cfg.cache_dir))


def prepare_data(cfg: DataConfig, tok_cfg: TokenizerConfig,
                 on_progress: Callable[[Progress], None] | None = None, verify: bool = False) -> PreparedData:
    """Every source's token cache, found or built, and the tokenizer they share; `verify` reads every shard of
    the caches found to check its content (else only those that changed since they were last checked)."""
    root = cache_root(cfg)
    sources = [(f"data.mixture.{i}", s) for i, s in enumerate(cfg.mixture)] or [("data", cfg)]
    settings = tokenizer_settings(tok_cfg)
    caches = {key: _open_prepared(key, s, tok_cfg, verify) for key, s in sources if s.source == SourceKind.prepared}
    raw = [(key, s) for key, s in sources if key not in caches]
    loaded: dict[str, Splits] = {}

    def splits(key: str, s: SourceConfig) -> Splits:  # each source is loaded at most once, and only if needed
        if key not in loaded:
            loaded[key] = load_splits(s, key)
        return loaded[key]

    if caches:  # the tokenizer of the given caches tokenizes everything else too
        given = next(iter(caches.values())).tokenizer.tokenizer.to_str()
        tokenizer_key = hashlib.sha256(given.encode()).hexdigest()[:16]
    else:
        fingerprints = [source_fingerprint(s, key) for key, s in raw]
        tokenizer_key = tokenizer_fingerprint(tok_cfg, fingerprints[0] if len(raw) == 1 else digest(fingerprints))
    folders = {key: root / "data" / digest([CACHE_FORMAT, source_fingerprint(s, key), tokenizer_key, s.max_tokens])
               for key, s in raw}
    for key, s in raw:
        try:
            cache = open_cache(folders[key], verify)
        except DamagedCache:
            cache = None  # build_cache says what is wrong, and rebuilds it
        if cache is not None:
            log.info("Using tokenized %s from %s (%s training tokens)", s.name, cache.path,
                     f"{cache.num_tokens('train'):,}")
            caches[key] = cache

    def make_tokenizer() -> TextTokenizer:  # the tokenizer of any cache there is; trained only for the first
        if caches:
            return next(iter(caches.values())).tokenizer
        return get_tokenizer(tok_cfg, tokenizer_key, root,
                             lambda: _training_texts([splits(k, s) for k, s in raw], tok_cfg))

    for key, s in raw:
        if key not in caches:
            try:
                caches[key] = build_cache(folders[key], s, key, functools.partial(splits, key, s), make_tokenizer,
                                          settings, on_progress, verify)
            except ValueError as e:  # a streamed dataset's files disagree on columns: found mid-stream
                if columns_disagree(e) is None:
                    raise
                where = f"{key}.path={s.path!r}" if s.path else f"{key} ({s.name})"
                raise DataError(f"{where}: {columns_disagree(e)}") from None
    caches = {key: caches[key] for key, _ in sources}  # config order
    (first_key, first), *others = caches.items()
    for key, cache in others:
        if not same_tokenizer(cache.tokenizer, first.tokenizer):
            raise DataError(f"{key} ({cache.path}) was built with another tokenizer than {first_key} ({first.path}); "
                            "a run needs one tokenizer for all its data: prepare it again, or remove the cache folder")
    by_name = {s.name: caches[key] for key, s in sources}
    weights = None
    if cfg.mixture:
        total = sum(s.weight for s in cfg.mixture)
        weights = {s.name: s.weight / total for s in cfg.mixture}
        log.info("Mixture: %s", ", ".join(f"{name} {100 * w:.0f}% ({by_name[name].num_tokens('train'):,} tokens)"
                                          for name, w in weights.items()))
    return PreparedData(first.tokenizer, by_name, weights)


def _open_prepared(key: str, s: SourceConfig, tok_cfg: TokenizerConfig, verify: bool) -> TokenCache:
    """A cache folder named by path: complete, and made with the tokenizer this run asks for: the same
    tokenizer.json for tokenizer=file, else the same settings."""
    path = Path(os.path.expanduser(s.path or ""))
    try:
        cache = open_cache(path, verify)
    except DamagedCache as e:  # a folder given by path is not ours to rebuild
        raise DataError(f"{key}.path={s.path!r} is a damaged token cache ({e}); prepare it again, or delete "
                        f"{path} and run `lmtrain prepare` for its data") from None
    if cache is None:
        raise DataError(f"{key}.path={s.path!r} is not a complete token cache (no current {path / 'manifest.json'}); "
                        "give a folder that `lmtrain prepare` printed, or prepare it again")
    made_with, settings = cache.manifest["tokenizer"], tokenizer_settings(tok_cfg)
    if tok_cfg.kind == TokenizerKind.file:
        given = TextTokenizer.load(Path(os.path.expanduser(tok_cfg.path)), tok_cfg.eot_token)
        matches = same_tokenizer(given, cache.tokenizer)
    else:
        matches = made_with == settings
    if not matches:
        raise DataError(f"{key}.path={s.path!r} was built with another tokenizer ({_describe(made_with)}) than this "
                        f"run's ({_describe(settings)}); set the same tokenizer keys, e.g. "
                        f"tokenizer={made_with['kind']}, or prepare the data again with this tokenizer")
    return cache


def _describe(settings: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items())


def _training_texts(sources: list[Splits], cfg: TokenizerConfig) -> Iterator[str]:
    """Texts a trained tokenizer learns from: the first tokenizer.train_documents training documents,
    shared equally between the sources of a mixture (weights do not matter, so changing them keeps it)."""
    per_source = [_texts(s) for s in sources]
    if cfg.kind == TokenizerKind.char or cfg.train_documents is None:  # char: every character must be seen
        return itertools.chain(*per_source)
    share = max(1, cfg.train_documents // len(sources))
    return itertools.chain(*(itertools.islice(texts, share) for texts in per_source))


def _texts(splits: Splits) -> Iterator[str]:
    return (row[splits.text_column] for row in splits.train)
