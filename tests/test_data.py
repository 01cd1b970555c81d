"""Sources, tokenizers and the token cache: reuse, rebuilds, splits, and the errors a user sees."""

import json

import numpy as np
import pytest

from lmtrain.config import DataConfig, SourceKind, TokenizerConfig, TokenizerKind
from lmtrain.data import cache as cache_module
from lmtrain.data.cache import prepare_tokens
from lmtrain.data.sources import load_splits, stdlib_files
from lmtrain.errors import DataError


def files_cfg(tmp_path, train, val=(), **kw) -> DataConfig:
    return DataConfig(name="test", source=SourceKind.text_files, train_files=[str(p) for p in train],
                      val_files=[str(p) for p in val], cache_dir=str(tmp_path / "cache"), **kw)


def test_char_tokens_round_trip_and_documents_end_with_eot(tmp_path, corpus):
    cache = prepare_tokens(files_cfg(tmp_path, [corpus["train"]], [corpus["val"]]),
                           TokenizerConfig(kind=TokenizerKind.char))
    tok = cache.tokenizer
    train = np.asarray(cache.tokens("train"))
    assert cache.manifest["dtype"] == "uint16" and train[-1] == tok.eot_id
    assert tok.decode(train[:-1]) == corpus["train"].read_text()
    assert cache.manifest["splits"]["train"]["documents"] == 1 and cache.manifest["splits"]["val"]["documents"] == 1


def test_second_prepare_reuses_the_cache_without_loading_data(tmp_path, corpus, monkeypatch):
    cfg = files_cfg(tmp_path, [corpus["train"]], [corpus["val"]])
    first = prepare_tokens(cfg, TokenizerConfig(kind=TokenizerKind.char))

    def no_loading(_):
        raise AssertionError("the data was loaded again")

    monkeypatch.setattr(cache_module, "load_splits", no_loading)
    again = prepare_tokens(cfg, TokenizerConfig(kind=TokenizerKind.char))
    assert again.path == first.path
    with pytest.raises(AssertionError, match="loaded again"):  # other tokenizer settings: a new cache
        prepare_tokens(cfg, TokenizerConfig(kind=TokenizerKind.bpe, vocab_size=300))


def test_one_long_text_validates_on_its_token_tail(tmp_path, corpus):
    cache = prepare_tokens(files_cfg(tmp_path, [corpus["train"]], val_fraction=0.1),
                           TokenizerConfig(kind=TokenizerKind.char))
    train, val = np.asarray(cache.tokens("train")), np.asarray(cache.tokens("val"))
    whole = cache.tokenizer.encode(corpus["train"].read_text()) + [cache.tokenizer.eot_id]
    assert train.tolist() + val.tolist() == whole
    assert len(val) == int(len(whole) * 0.1)


def test_jsonl_records_become_documents(tmp_path, corpus):
    cfg = files_cfg(tmp_path, [corpus["jsonl"]], text_column="content", val_fraction=0.1)
    splits = load_splits(cfg)
    assert len(splits.train) + len(splits.val) == 400
    assert 20 <= len(splits.val) <= 60


def test_pystdlib_is_split_by_file_and_skips_tests():
    files = stdlib_files()
    assert len(files) > 300
    assert not any("/test/" in str(f) or "site-packages" in str(f) for f in files)
    splits = load_splits(DataConfig(max_documents=None))
    assert len(splits.train) + len(splits.val) == len(files)
    assert set(splits.train["path"]).isdisjoint(splits.val["path"])
    assert 0.02 < len(splits.val) / len(files) < 0.1


def test_bpe_tokenizer_has_the_configured_size_and_specials(tmp_path, corpus):
    cfg = files_cfg(tmp_path, [corpus["jsonl"]], text_column="content")
    cache = prepare_tokens(cfg, TokenizerConfig(kind=TokenizerKind.bpe, vocab_size=300, min_frequency=1))
    tok = cache.tokenizer
    assert tok.vocab_size <= 300 and tok.tokenizer.token_to_id("<|endoftext|>") == tok.eot_id
    text = "the quick brown fox ünïcödé"
    assert tok.decode(tok.encode(text)) == text  # byte-level: nothing is unknown


def test_file_tokenizer_is_used_as_given(tmp_path, corpus):
    trained = prepare_tokens(files_cfg(tmp_path, [corpus["train"]], [corpus["val"]]),
                             TokenizerConfig(kind=TokenizerKind.char))
    path = tmp_path / "mine.json"
    trained.tokenizer.save(path)
    cache = prepare_tokens(files_cfg(tmp_path, [corpus["jsonl"]], text_column="content"),
                           TokenizerConfig(kind=TokenizerKind.file, path=str(path)))
    assert cache.tokenizer.vocab_size == trained.tokenizer.vocab_size


def test_max_tokens_caps_a_split(tmp_path, corpus):
    cache = prepare_tokens(files_cfg(tmp_path, [corpus["jsonl"]], text_column="content", max_tokens=1000),
                           TokenizerConfig(kind=TokenizerKind.char))
    assert len(cache.tokens("train")) == 1000


@pytest.mark.parametrize("make_cfg, message", [
    (lambda tmp, c: files_cfg(tmp, [tmp / "missing.txt"]), "data.train_files: no file found at"),
    (lambda tmp, c: files_cfg(tmp, [c["train"]], [tmp / "gone/*.txt"]), "data.val_files: no file found at"),
    (lambda tmp, c: files_cfg(tmp, [c["jsonl"]]), "data.text_column='text' is not a column of the train split; "
                                                  "its columns are ['content']"),
    (lambda tmp, c: files_cfg(tmp, [c["train"], c["jsonl"]]), "mixes file types"),
])
def test_data_mistakes_are_named(tmp_path, corpus, make_cfg, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
        prepare_tokens(make_cfg(tmp_path, corpus), TokenizerConfig(kind=TokenizerKind.char))


def test_empty_file_is_an_error(tmp_path, corpus):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match="no text"):
        prepare_tokens(files_cfg(tmp_path, [empty]), TokenizerConfig(kind=TokenizerKind.char))


def test_hub_dataset_offline_is_a_clear_error(tmp_path):
    cfg = DataConfig(source=SourceKind.hf, path="no-such-user/no-such-dataset", cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="data.path='no-such-user/no-such-dataset'.*could not be loaded"):
        load_splits(cfg)


def test_pretrained_tokenizer_offline_is_a_clear_error(tmp_path, corpus):
    from lmtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="tokenizer.name='gpt2' could not be fetched from the Hugging Face hub"):
        prepare_tokens(files_cfg(tmp_path, [corpus["train"]]), TokenizerConfig(kind=TokenizerKind.pretrained,
                                                                                  name="gpt2"))
