"""Where documents come from: the built-in Python-stdlib corpus, local files, or a Hugging Face dataset.

Every source yields `datasets` objects with one document per record in `cfg.text_column`, split into
train and validation. `source_fingerprint` identifies a source without loading it, so a cached
tokenization is found again without touching the network or reading the corpus.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import itertools
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmtrain.config import EncodingErrors, SourceConfig, SourceKind
from lmtrain.data.text_files import jsonl_records, text_records
from lmtrain.errors import DataError

# Documents at or above this count are split by document; fewer (one long text, say) by the tail of the tokens.
MIN_DOCS_FOR_DOCUMENT_SPLIT = 100

_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idle_test", "test", "tests"}
_EXTENSION_BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
                       ".csv": "csv"}


@dataclass
class Splits:
    """Training and validation documents. `val` None means: hold out the tail of the training tokens."""

    train: datasets.Dataset | datasets.IterableDataset
    val: datasets.Dataset | datasets.IterableDataset | None
    text_column: str


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stdlib_files() -> list[Path]:
    """The standard library's .py files, without its test suites and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("test"))
        files += [Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def _in_val(key: str, val_fraction: float) -> bool:
    """Deterministic by-document split: a document's name hashes to a number in [0, 1)."""
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 16**8
    return h < val_fraction


def expand_files(patterns: list[str], key: str) -> list[Path]:
    """Paths and globs to a sorted list of existing files; a pattern matching nothing is an error naming it."""
    files: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if os.path.isdir(expanded):
            raise DataError(f"{key}: {pattern!r} is a folder; give the files in it, e.g. "
                            f"{key}=[{pattern.rstrip('/')}/*.txt] (or **/*.txt to include subfolders)")
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataError(f"{key}: no file found at {pattern!r}")
        files += [Path(m).resolve() for m in matches]
    suffixes = {f.suffix.lower() for f in files}
    unknown = suffixes - set(_EXTENSION_BUILDERS)
    if unknown:
        raise DataError(f"{key}: unsupported file type {sorted(unknown)}; use {sorted(_EXTENSION_BUILDERS)}")
    if len({_EXTENSION_BUILDERS[s] for s in suffixes}) > 1:
        raise DataError(f"{key}: mixes file types {sorted(suffixes)}; give one kind of file per list")
    return files


def source_fingerprint(cfg: SourceConfig, key: str = "data") -> str:
    """Identifies the documents a config selects, from names, sizes and dates only."""
    common = [cfg.text_column, cfg.val_fraction, cfg.max_documents]
    if cfg.encoding_errors != EncodingErrors.strict or cfg.skip_bad_records:  # the default keeps older cache keys
        common += [EncodingErrors(cfg.encoding_errors).value, cfg.skip_bad_records]
    if cfg.source == SourceKind.pystdlib:
        files = stdlib_files()
        return digest(["pystdlib", sys.version, [(str(f), f.stat().st_size) for f in files], common])
    if cfg.source == SourceKind.text_files:
        listed = [[(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in expand_files(p, f"{key}.{k}")]
                  for p, k in [(cfg.train_files, "train_files"), (cfg.val_files, "val_files")] if p]
        return digest(["text_files", listed, common])
    local = Path(os.path.expanduser(cfg.path or ""))
    files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else []  # a local dataset folder
    files += expand_files(cfg.data_files, f"{key}.data_files") if cfg.data_files else []  # a builder's files
    return digest(["hf", cfg.path, cfg.config_name, cfg.split, cfg.val_split, cfg.revision, common,
                   [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]])


def load_splits(cfg: SourceConfig, key: str = "data") -> Splits:
    """Load the configured documents, check the text column, and split off validation.

    `key` is where the source sits in the config (data, or data.mixture.N), for error messages.
    """
    if cfg.source == SourceKind.pystdlib:
        return _pystdlib_splits(cfg)
    limited = False  # whether the reader applied data.max_documents itself
    if cfg.source == SourceKind.text_files:
        train_files = expand_files(cfg.train_files, f"{key}.train_files")
        train = _load_files(train_files, cfg)
        val = _load_files(expand_files(cfg.val_files, f"{key}.val_files"), cfg) if cfg.val_files else None
        where = {"train": f"{key}.train_files", "validation": f"{key}.val_files"}
        limited = train_files[0].suffix.lower() in _READERS
        if val is None and _one_document_per_file(train_files) and len(train_files) < MIN_DOCS_FOR_DOCUMENT_SPLIT:
            return Splits(train=train, val=None, text_column=cfg.text_column)  # a few long texts: split their tail
    else:
        train, val = _load_hf(cfg, key)
        where = {"train": f"{key}.path={cfg.path!r}", "validation": f"{key}.path={cfg.path!r}"}
    for split_name, ds in [("train", train), ("validation", val)]:
        if ds is not None:
            _check_documents(ds, cfg.text_column, split_name, where[split_name], key)
    train = train if limited else _limit(train, cfg.max_documents)
    if val is None:
        train, val = _split_by_document(train, cfg.val_fraction)
    elif not limited:
        val = _limit(val, cfg.max_documents)
    return Splits(train=train, val=val, text_column=cfg.text_column)


def source_texts(cfg) -> Iterator[str]:
    """Every document of a data config (each source of a mixture), training and validation alike."""
    for key, source in [(f"data.mixture.{i}", s) for i, s in enumerate(cfg.mixture)] or [("data", cfg)]:
        splits = load_splits(source, key)
        for ds in (splits.train, splits.val):
            yield from (row[splits.text_column] for row in ds or [])


def _pystdlib_splits(cfg: SourceConfig) -> Splits:
    root = Path(sysconfig.get_paths()["stdlib"])
    records: dict[bool, dict[str, list[str]]] = {False: {"text": [], "path": []}, True: {"text": [], "path": []}}
    for f in stdlib_files()[: cfg.max_documents]:
        rel = str(f.relative_to(root))
        side = records[_in_val(rel, cfg.val_fraction)]
        side["text"].append(f.read_text(encoding="utf-8", errors="replace"))
        side["path"].append(rel)
    if not records[True]["text"]:  # a handful of files (data.max_documents), none hashed to validation:
        return Splits(_datasets().Dataset.from_dict(records[False]), None, "text")  # validate on the token tail
    return Splits(_datasets().Dataset.from_dict(records[False]), _datasets().Dataset.from_dict(records[True]), "text")


if TYPE_CHECKING:
    import datasets

    Loaded = datasets.Dataset | datasets.IterableDataset


def _datasets():
    """The `datasets` package, imported where a source is read: it takes half a second (pandas, pyarrow), which a
    run whose tokens are cached already, and every command that reads no data, would pay at start-up."""
    import datasets

    return datasets


def _one_document_per_file(files: list[Path]) -> bool:
    return _EXTENSION_BUILDERS[files[0].suffix.lower()] == "text"


def _text_stream(files: list[str], cfg: SourceConfig) -> datasets.IterableDataset:
    errors = EncodingErrors(cfg.encoding_errors).value
    return text_records(files, cfg.text_column, errors, cfg.max_documents)


def _jsonl_stream(files: list[str], cfg: SourceConfig) -> datasets.IterableDataset:
    errors = EncodingErrors(cfg.encoding_errors).value
    return jsonl_records(files, cfg.text_column, errors, cfg.skip_bad_records, cfg.max_documents)


# Read by lmtrain itself, in pieces, with errors that name the file and the line or byte (lmtrain.data.text_files).
_READERS = {".txt": _text_stream, ".md": _text_stream, ".jsonl": _jsonl_stream}


def _load_files(files: list[Path], cfg: SourceConfig) -> datasets.IterableDataset:
    """Local files, streamed: read in pieces as tokenization goes, never converted to Arrow or held whole."""
    reader = _READERS.get(files[0].suffix.lower())
    if reader is not None:
        generate = functools.partial(reader, cfg=cfg)
        return _datasets().IterableDataset.from_generator(generate, gen_kwargs={"files": [str(f) for f in files]})
    builder = _EXTENSION_BUILDERS[files[0].suffix.lower()]
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    return _datasets().load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True,
                                    **kwargs)


def _load_hf(cfg: SourceConfig, key: str) -> tuple[Loaded, Loaded | None]:
    """The training split and the validation split: data.val_split, else the dataset's own `validation` split."""
    data_files = [str(f) for f in expand_files(cfg.data_files, f"{key}.data_files")] if cfg.data_files else None
    try:
        builder = _datasets().load_dataset_builder(cfg.path, cfg.config_name, revision=cfg.revision,
                                                data_files=data_files)
        names = {str(name) for name in [*(builder.config.data_files or {}), *(builder.info.splits or {})]}
        val_split = cfg.val_split or ("validation" if "validation" in names else None)
        if cfg.streaming:  # nothing is downloaded or converted: records are read as training needs them
            get = builder.as_streaming_dataset
        else:
            builder.download_and_prepare()
            get = builder.as_dataset
        return get(split=cfg.split), get(split=val_split) if val_split else None
    except StopIteration:  # what `datasets` raises for data files without a single record
        raise DataError(f"{key}.path={cfg.path!r}: the dataset is empty, its data files hold no records") from None
    except Exception as e:  # the hub client raises many types (connection, not found, gated, offline)
        if columns_disagree(e) is not None:
            raise DataError(f"{key}.path={cfg.path!r}: {columns_disagree(e)}") from None
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if Path(os.path.expanduser(cfg.path or "")).exists():  # a local folder: the network is not the problem
            raise DataError(f"{key}.path={cfg.path!r} could not be loaded: {first_line}") from None
        offline = any(os.environ.get(v, "0") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        raise DataError(
            f"{key}.path={cfg.path!r} could not be loaded: {first_line}. "
            + ("This process is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE). " if offline else "")
            + f"Without the network, download the dataset elsewhere and point {key}.path at the local folder."
        ) from None


def columns_disagree(e: BaseException) -> str | None:
    """What `datasets` means by a CastError anywhere in an exception's chain: the data files of one dataset do
    not share their columns (a streamed one finds out at the first record of the odd file). None otherwise."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, _datasets().table.CastError):
            detail = " ".join(str(e).split())  # "Couldn't cast text: string extra: int64 to {...} because ..."
            return (f"its data files do not all have the same columns ({detail}); give it files of one layout, "
                    "or move the odd ones to a dataset of their own")
        e = e.__cause__ or e.__context__
    return None


def _check_documents(ds: Loaded, column: str, split: str, where: str, key: str) -> None:
    """The split has records, and the text column among its columns."""
    columns = ds.column_names
    if isinstance(ds, _datasets().IterableDataset):  # a stream learns its columns from the first record
        first = next(iter(ds), None)
        if first is None:
            raise DataError(f"{where}: the {split} split is empty")
        columns = columns or list(first)
    elif len(ds) == 0:
        raise DataError(f"{where}: the {split} split is empty")
    if column not in columns:
        raise DataError(f"{key}.text_column={column!r} is not a column of the {split} split; its columns are {columns}")


def _limit(ds, max_documents: int | None):
    if max_documents is None:
        return ds
    return ds.take(max_documents) if isinstance(ds, _datasets().IterableDataset) else ds.select(
        range(min(max_documents, len(ds))))


def _split_by_document(ds: Loaded, val_fraction: float) -> tuple[Loaded, Loaded | None]:
    """Hold out whole documents when there are many; otherwise (val None) the tail of the tokens."""
    if isinstance(ds, _datasets().IterableDataset):
        if sum(1 for _ in itertools.islice(ds, MIN_DOCS_FOR_DOCUMENT_SPLIT)) < MIN_DOCS_FOR_DOCUMENT_SPLIT:
            return ds, None  # the stream ended early: only its first records were read to know
        every = max(2, round(1 / val_fraction))  # every k-th document: deterministic and needs no length
        if "_document" in next(iter(ds)):  # lmtrain's own readers number the documents (a file's pieces share one)
            return (ds.filter(lambda r: r["_document"] % every != 0), ds.filter(lambda r: r["_document"] % every == 0))
        return (ds.filter(lambda _, i: i % every != 0, with_indices=True),
                ds.filter(lambda _, i: i % every == 0, with_indices=True))
    if len(ds) < MIN_DOCS_FOR_DOCUMENT_SPLIT:
        return ds, None
    parts = ds.train_test_split(test_size=val_fraction, seed=0, shuffle=True)
    return parts["train"], parts["test"]
