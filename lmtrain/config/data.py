"""Data and tokenizer schemas (`data=...`, `tokenizer=...`), shared by train, prepare and eval."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from lmtrain.config.base import CHECKS, check


class SourceKind(str, Enum):
    pystdlib = "pystdlib"  # the Python standard library's own source files
    text_files = "text_files"  # local .txt / .md / .jsonl / .json / .parquet / .csv files
    hf = "hf"  # a Hugging Face dataset (hub name or local folder)
    prepared = "prepared"  # a token cache folder that `lmtrain prepare` wrote (data.path)


class EncodingErrors(str, Enum):
    strict = "strict"  # bytes that are not UTF-8 stop preparation, naming the file and byte offset
    replace = "replace"  # such bytes become U+FFFD


@dataclass
class SourceConfig:
    """One corpus: where its documents come from and how validation is split off."""

    name: str = "pystdlib"  # shown in logs; names each source of a mixture
    source: SourceKind = SourceKind.pystdlib
    train_files: list[str] = field(default_factory=list)  # text_files: paths or globs for training
    val_files: list[str] = field(default_factory=list)  # text_files: paths or globs for validation
    path: str | None = None  # hf: dataset name on the hub, or a local folder; prepared: the cache folder
    config_name: str | None = None  # hf: dataset configuration (subset) name
    split: str = "train"  # hf: split to train on
    val_split: str | None = None  # hf: split to validate on; None: the dataset's `validation` split, else val_fraction
    revision: str | None = None  # hf: dataset revision (branch, tag or commit)
    # hf: local files for a builder named by data.path (csv, json, parquet, text): its `train` split
    data_files: list[str] = field(default_factory=list)
    streaming: bool = False  # hf: read and tokenize on the fly; the raw dataset is never downloaded whole
    text_column: str = "text"  # column that holds the documents
    val_fraction: float = 0.05  # share held out for validation when there is no validation split
    max_documents: int | None = None  # use at most this many documents per split; None: all
    max_tokens: int | None = None  # training tokens to prepare at most (validation: val_fraction of it); None: all
    encoding_errors: EncodingErrors = EncodingErrors.strict  # text_files: what to do with bytes that are not UTF-8
    skip_bad_records: bool = False  # text_files .jsonl: skip (and count) lines that are not a record with text


@dataclass
class MixtureSource(SourceConfig):
    weight: float = 1.0  # share of training sequences drawn from this source; weights are normalized


@dataclass
class DataConfig(SourceConfig):
    # Several sources sampled by weight, each a source config plus `weight`; when set, the single-source
    # keys above stay unused (set them per source: data.mixture.1.train_files=[...]).
    mixture: list[MixtureSource] = field(default_factory=list)
    cache_dir: str = "${oc.env:LMTRAIN_CACHE,'~/.cache/lmtrain'}"  # tokenized data and tokenizers


class TokenizerKind(str, Enum):
    bpe = "bpe"  # byte-level BPE trained on the training split
    char = "char"  # one token per character seen in the training split
    file = "file"  # a tokenizer.json file
    pretrained = "pretrained"  # a tokenizer from the Hugging Face hub, by name
    gpt2 = "gpt2"  # GPT-2's byte-level BPE (50,257 tokens), shipped with lmtrain: no network


@dataclass
class TokenizerConfig:
    kind: TokenizerKind = TokenizerKind.bpe
    vocab_size: int = 4096  # bpe: target vocabulary size, special tokens included
    min_frequency: int = 2  # bpe: a merge must occur this often
    train_documents: int | None = 20000  # bpe/char: documents to train on; None: all
    path: str | None = None  # file: path to a tokenizer.json
    name: str | None = None  # pretrained: hub name, e.g. gpt2
    # the token that ends each document (and stops generation); None: the first of <|endoftext|>, </s>,
    # <|end_of_text|>, <eos>, <|im_end|>, [SEP] the tokenizer has. A Hugging Face model sets its own eos.
    eot_token: str | None = None



@dataclass
class PrepareConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    verify: bool = False  # read every shard of the caches found and check its SHA-256 and token ids (bit rot)


def validate_data(d: DataConfig) -> None:
    if d.mixture:
        check(not (d.train_files or d.val_files or d.path),
               "data.mixture is set: give files and paths per source (data.mixture.0.train_files=[...]), "
               "not as data.train_files, data.val_files or data.path")
        names = [s.name for s in d.mixture]
        check(len(set(names)) == len(names), f"data.mixture names {names} must differ: they name each source "
                                              "in the logs (data.mixture.1.name=prose)")
        for i, s in enumerate(d.mixture):
            check(s.weight > 0, f"data.mixture.{i}.weight={s.weight} must be > 0")
            _validate_source(s, f"data.mixture.{i}")
    else:
        _validate_source(d, "data")


def _validate_source(s: SourceConfig, key: str) -> None:
    check(0 < s.val_fraction < 1, f"{key}.val_fraction={s.val_fraction} must be in (0, 1)")
    if s.max_documents is not None:
        check(s.max_documents > 0, f"{key}.max_documents={s.max_documents} must be > 0 (or null for all)")
    if s.max_tokens is not None:
        check(s.max_tokens > 0, f"{key}.max_tokens={s.max_tokens} must be > 0 (or null for all)")
    if s.source == SourceKind.text_files:
        check(bool(s.train_files), f"{key}.train_files is empty: give the text files to train on, "
                                    f"e.g. {key}.train_files=[corpus/*.txt]")
    if s.source == SourceKind.hf:
        check(bool(s.path), f"{key}.path is not set: name a Hugging Face dataset, "
                             f"e.g. {key}.path=roneneldan/TinyStories")
    else:
        check(not s.data_files, f"{key}.data_files is for data=hf with a builder (data.path=csv); for local files "
                                f"use data=text_files {key}.train_files=[...]")
    if s.source == SourceKind.prepared:
        check(bool(s.path), f"{key}.path is not set: give the folder `lmtrain prepare` printed")


def validate_tokenizer(tok: TokenizerConfig) -> None:
    if tok.kind == TokenizerKind.bpe:
        check(tok.vocab_size >= 260, f"tokenizer.vocab_size={tok.vocab_size} must be >= 260 "
                                      "(256 byte tokens plus specials)")
    if tok.kind == TokenizerKind.file:
        check(bool(tok.path), "tokenizer.path is not set: give the tokenizer.json to use")
    if tok.kind == TokenizerKind.pretrained:
        check(bool(tok.name), "tokenizer.name is not set: give a hub name, e.g. tokenizer.name=gpt2")


def validate_prepare(cfg: PrepareConfig) -> None:
    validate_data(cfg.data)
    validate_tokenizer(cfg.tokenizer)


CHECKS.update({DataConfig: validate_data, PrepareConfig: validate_prepare})
