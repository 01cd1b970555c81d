"""Sources, tokenizers and the token cache: reuse, rebuilds, shards, crash safety, splits, mixtures, and errors."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from lmtrain.config import DataConfig, MixtureSource, SourceKind, TokenizerConfig, TokenizerKind
from lmtrain.data import cache as cache_module
from lmtrain.data import prepare as prepare_module
from lmtrain.data.cache import open_cache
from lmtrain.data.loader import train_loader
from lmtrain.data.prepare import prepare_data
from lmtrain.data.sources import load_splits, stdlib_files
from lmtrain.errors import DataError

CHAR = TokenizerConfig(kind=TokenizerKind.char)


def files_cfg(tmp_path, train, val=(), **kw) -> DataConfig:
    return DataConfig(name="test", source=SourceKind.text_files, train_files=[str(p) for p in train],
                      val_files=[str(p) for p in val], cache_dir=str(tmp_path / "cache"), **kw)


def prepare_one(cfg: DataConfig, tok: TokenizerConfig = CHAR):
    """The single source's cache."""
    (cache,) = prepare_data(cfg, tok).caches.values()
    return cache


def tokens(cache, split: str) -> np.ndarray:
    return np.concatenate([np.asarray(s) for s in cache.shards(split)])


def test_char_tokens_round_trip_and_documents_end_with_eot(tmp_path, corpus):
    cache = prepare_one(files_cfg(tmp_path, [corpus["train"]], [corpus["val"]]))
    tok = cache.tokenizer
    train = tokens(cache, "train")
    assert cache.manifest["dtype"] == "uint16" and train[-1] == tok.eot_id
    assert tok.decode(train[:-1]) == corpus["train"].read_text()
    assert cache.manifest["splits"]["train"]["documents"] == 1 and cache.manifest["splits"]["val"]["documents"] == 1
    assert not (cache.path / "progress.json").exists()


def test_second_prepare_reuses_the_cache_without_loading_data(tmp_path, corpus, monkeypatch):
    cfg = files_cfg(tmp_path, [corpus["train"]], [corpus["val"]])
    first = prepare_one(cfg)

    def no_loading(*_):
        raise AssertionError("the data was loaded again")

    monkeypatch.setattr(prepare_module, "load_splits", no_loading)
    assert prepare_one(cfg).path == first.path
    with pytest.raises(AssertionError, match="loaded again"):  # other tokenizer settings: a new cache
        prepare_one(cfg, TokenizerConfig(kind=TokenizerKind.bpe, vocab_size=300))


def test_shards_fill_in_turn_and_hold_the_same_tokens(tmp_path, corpus, monkeypatch):
    cfg = files_cfg(tmp_path, [corpus["jsonl"]], text_column="content")
    whole = prepare_one(cfg)
    monkeypatch.setattr(cache_module, "BATCH_DOCUMENTS", 50)
    monkeypatch.setattr(cache_module, "SHARD_TOKENS", 2000)
    monkeypatch.setattr(cache_module, "TOKENIZE_CHARS", 500)  # a few documents per tokenizer call
    sharded = prepare_one(files_cfg(tmp_path / "other", [corpus["jsonl"]], text_column="content"))
    names = [s["file"] for s in sharded.manifest["splits"]["train"]["shards"]]
    assert len(names) > 3 and names[:2] == ["train-00000.bin", "train-00001.bin"]
    assert all(s["tokens"] >= 2000 for s in sharded.manifest["splits"]["train"]["shards"][:-1])
    for split in ("train", "val"):
        assert np.array_equal(tokens(sharded, split), tokens(whole, split))


def test_one_long_text_validates_on_its_token_tail(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(cache_module, "BATCH_DOCUMENTS", 1)
    monkeypatch.setattr(cache_module, "SHARD_TOKENS", 3000)  # the tail spans shards
    long_text = tmp_path / "long.txt"
    long_text.write_text(corpus["train"].read_text() * 2)
    other = tmp_path / "other.txt"
    other.write_text(corpus["val"].read_text())
    cache = prepare_one(files_cfg(tmp_path, [long_text, other], val_fraction=0.4))
    train, val = tokens(cache, "train"), tokens(cache, "val")
    eot = cache.tokenizer.eot_id
    whole = [t for f in (long_text, other) for t in cache.tokenizer.encode(f.read_text()) + [eot]]
    assert train.tolist() + val.tolist() == whole
    assert len(val) == int(len(whole) * 0.4)
    assert {s["file"] for s in cache.manifest["splits"]["val"]["shards"]} <= {p.name for p in cache.path.iterdir()}


def test_jsonl_records_become_documents(tmp_path, corpus):
    cfg = files_cfg(tmp_path, [corpus["jsonl"]], text_column="content", val_fraction=0.1)
    splits = load_splits(cfg)
    train, val = [row["content"] for row in splits.train], [row["content"] for row in splits.val]
    assert len(train) + len(val) == 400 and len(val) == 40  # every 10th document
    assert sorted(train + val) == sorted(json.loads(line)["content"] for line in corpus["jsonl"].open())


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
    cache = prepare_one(cfg, TokenizerConfig(kind=TokenizerKind.bpe, vocab_size=300, min_frequency=1))
    tok = cache.tokenizer
    assert tok.vocab_size <= 300 and tok.tokenizer.token_to_id("<|endoftext|>") == tok.eot_id
    text = "the quick brown fox ünïcödé"
    assert tok.decode(tok.encode(text)) == text  # byte-level: nothing is unknown


def test_file_tokenizer_is_used_as_given(tmp_path, corpus):
    trained = prepare_one(files_cfg(tmp_path, [corpus["train"]], [corpus["val"]]))
    path = tmp_path / "mine.json"
    trained.tokenizer.save(path)
    cache = prepare_one(files_cfg(tmp_path, [corpus["jsonl"]], text_column="content"),
                        TokenizerConfig(kind=TokenizerKind.file, path=str(path)))
    assert cache.tokenizer.vocab_size == trained.tokenizer.vocab_size


def test_max_tokens_caps_training_and_validation_in_proportion(tmp_path, corpus):
    cache = prepare_one(files_cfg(tmp_path, [corpus["train"]], [corpus["val"]], max_tokens=1000, val_fraction=0.1))
    assert len(tokens(cache, "train")) == 1000 and len(tokens(cache, "val")) == 100


_KILLED_PREPARE = """
import os, signal, sys
from lmtrain.config import DataConfig, MixtureSource, SourceKind, TokenizerConfig, TokenizerKind
from lmtrain.data import cache
from lmtrain.data.prepare import prepare_data
cache.BATCH_DOCUMENTS, cache.SHARD_TOKENS = 20, 1500
reports = 0
def die_midway(progress):
    global reports
    reports += 1
    if reports == 12:  # a few shards in, with one half written
        os.kill(os.getpid(), signal.SIGKILL)
cfg = DataConfig(name="test", source=SourceKind.text_files, train_files=[sys.argv[1]], text_column="content",
                 cache_dir=sys.argv[2])
prepare_data(cfg, TokenizerConfig(kind=TokenizerKind.char), die_midway)
"""


def test_a_killed_prepare_never_looks_complete_and_the_next_run_finishes_it(tmp_path, corpus, monkeypatch):
    reference = prepare_one(files_cfg(tmp_path / "ref", [corpus["jsonl"]], text_column="content"))
    cfg = files_cfg(tmp_path, [corpus["jsonl"]], text_column="content")
    killed = subprocess.run([sys.executable, "-c", _KILLED_PREPARE, str(corpus["jsonl"]), cfg.cache_dir],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (folder,) = (tmp_path / "cache" / "data").iterdir()
    assert open_cache(folder) is None and not (folder / "manifest.json").exists()
    progress = json.loads((folder / "progress.json").read_text())
    finished = [s["file"] for s in progress["train"]["shards"]]
    assert len(finished) >= 2 and (folder / f"train-{len(finished):05d}.bin").exists()  # one left half-written

    monkeypatch.setattr(cache_module, "BATCH_DOCUMENTS", 20)
    monkeypatch.setattr(cache_module, "SHARD_TOKENS", 1500)
    kept = {name: os.stat(folder / name).st_mtime_ns for name in finished}
    resumed = prepare_one(cfg)
    assert resumed.path == folder
    assert {name: os.stat(folder / name).st_mtime_ns for name in finished} == kept  # finished shards were kept
    for split in ("train", "val"):
        assert np.array_equal(tokens(resumed, split), tokens(reference, split))


def test_a_failed_prepare_is_rebuilt(tmp_path, corpus, monkeypatch):
    cfg = files_cfg(tmp_path, [corpus["jsonl"]], text_column="content")
    monkeypatch.setattr(cache_module, "BATCH_DOCUMENTS", 50)
    calls = []

    def fail_third(progress):
        calls.append(progress)
        if len(calls) == 3:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        prepare_data(cfg, CHAR, fail_third)
    (folder,) = (tmp_path / "cache" / "data").iterdir()
    assert open_cache(folder) is None
    cache = prepare_one(cfg)
    assert tokens(cache, "train").tolist() + tokens(cache, "val").tolist() != []
    assert cache.manifest["splits"]["train"]["documents"] + cache.manifest["splits"]["val"]["documents"] == 400


@pytest.mark.parametrize("make_cfg, message", [
    (lambda tmp, c: files_cfg(tmp, [tmp / "missing.txt"]), "data.train_files: no file found at"),
    (lambda tmp, c: files_cfg(tmp, [c["train"]], [tmp / "gone/*.txt"]), "data.val_files: no file found at"),
    (lambda tmp, c: files_cfg(tmp, [c["jsonl"]]), "data.text_column='text' is not a field of "),
    (lambda tmp, c: files_cfg(tmp, [c["train"], c["jsonl"]]), "mixes file types"),
])
def test_data_mistakes_are_named(tmp_path, corpus, make_cfg, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
        prepare_data(make_cfg(tmp_path, corpus), CHAR)


def test_a_file_without_text_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match="no text"):
        prepare_data(files_cfg(tmp_path, [empty]), CHAR)


def test_a_dataset_without_records_is_an_error(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("")
    for streaming in (False, True):
        cfg = DataConfig(source=SourceKind.hf, path=str(folder), streaming=streaming, cache_dir=str(tmp_path))
        with pytest.raises(DataError, match=f"data.path={str(folder)!r}.*(empty|no text)"):
            prepare_data(cfg, CHAR)


def test_hub_dataset_offline_is_a_clear_error(tmp_path):
    cfg = DataConfig(source=SourceKind.hf, path="no-such-user/no-such-dataset", cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="data.path='no-such-user/no-such-dataset'.*could not be loaded.*offline"):
        load_splits(cfg)


def test_pretrained_tokenizer_offline_is_a_clear_error(tmp_path, corpus):
    from lmtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="tokenizer.name='gpt2' could not be fetched from the Hugging Face hub"):
        prepare_data(files_cfg(tmp_path, [corpus["train"]]), TokenizerConfig(kind=TokenizerKind.pretrained,
                                                                                name="gpt2"))


def mixture_cfg(tmp_path, corpus, code_weight=0.7) -> DataConfig:
    return DataConfig(name="mix", cache_dir=str(tmp_path / "cache"), mixture=[
        MixtureSource(name="code", source=SourceKind.pystdlib, max_documents=40, weight=code_weight),
        MixtureSource(name="prose", source=SourceKind.text_files, train_files=[str(corpus["jsonl"])],
                      text_column="content", weight=1 - code_weight)])


def test_a_mixture_shares_one_tokenizer_and_keeps_a_cache_per_source(tmp_path, corpus, monkeypatch):
    data = prepare_data(mixture_cfg(tmp_path, corpus), CHAR)
    assert list(data.caches) == ["code", "prose"] and data.weights == pytest.approx({"code": 0.7, "prose": 0.3})
    code, prose = data.caches.values()
    assert code.path != prose.path
    assert code.tokenizer.tokenizer.to_str() == prose.tokenizer.tokenizer.to_str() == data.tokenizer.tokenizer.to_str()
    text = corpus["jsonl"].read_text()[:200] + "def f(x): return {x: [1]}"  # both sources' characters are known
    assert data.tokenizer.decode(data.tokenizer.encode(text)) == text

    monkeypatch.setattr(prepare_module, "load_splits", lambda *_: pytest.fail("re-tokenized for new weights"))
    again = prepare_data(mixture_cfg(tmp_path, corpus, code_weight=0.5), CHAR)
    assert [c.path for c in again.caches.values()] == [code.path, prose.path]
    assert again.weights == pytest.approx({"code": 0.5, "prose": 0.5})


def test_a_lost_source_cache_is_rebuilt_with_the_tokenizer_of_the_others(tmp_path, corpus, monkeypatch):
    first = prepare_data(mixture_cfg(tmp_path, corpus), TokenizerConfig(vocab_size=300))
    shutil.rmtree(first.caches["prose"].path)
    shutil.rmtree(tmp_path / "cache" / "tokenizers")  # retraining the BPE could give another vocabulary
    monkeypatch.setattr(prepare_module, "get_tokenizer", lambda *_: pytest.fail("trained a tokenizer again"))
    again = prepare_data(mixture_cfg(tmp_path, corpus), TokenizerConfig(vocab_size=300))
    assert again.caches["prose"].path == first.caches["prose"].path
    assert np.array_equal(tokens(again.caches["prose"], "train"), tokens(first.caches["prose"], "train"))


def test_a_prepared_folder_trains_with_its_own_tokenizer_only(tmp_path, corpus):
    made = prepare_one(files_cfg(tmp_path, [corpus["train"]], [corpus["val"]]))
    given = DataConfig(name="given", source=SourceKind.prepared, path=str(made.path), cache_dir=str(tmp_path / "x"))
    assert prepare_one(given).path == made.path
    with pytest.raises(DataError, match=r"data.path='.*' was built with another tokenizer \(kind=char\) than this "
                                        r"run's \(kind=bpe vocab_size=4096 .*\); .*tokenizer=char"):
        prepare_data(given, TokenizerConfig())
    with pytest.raises(DataError, match="is not a complete token cache"):
        prepare_data(DataConfig(source=SourceKind.prepared, path=str(tmp_path)), CHAR)


def test_a_mixture_of_caches_with_different_tokenizers_is_refused(tmp_path, corpus):
    a = prepare_one(files_cfg(tmp_path, [corpus["train"]], [corpus["val"]]))
    b = prepare_one(files_cfg(tmp_path, [corpus["jsonl"]], text_column="content"))  # other text, other characters
    cfg = DataConfig(mixture=[MixtureSource(name="a", source=SourceKind.prepared, path=str(a.path)),
                              MixtureSource(name="b", source=SourceKind.prepared, path=str(b.path))])
    with pytest.raises(DataError, match=r"data.mixture.1 \(.*\) was built with another tokenizer than "
                                        r"data.mixture.0 \("):
        prepare_data(cfg, CHAR)


def test_a_corpus_shorter_than_one_window_is_named(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello world")  # 11 characters and end-of-text: 11 train tokens, 1 held out
    data = prepare_data(files_cfg(tmp_path, [tiny]), CHAR)
    with pytest.raises(DataError, match=r"the train split has 11 tokens, fewer than one window of "
                                        r"model.block_size\+1=17; use more text or a smaller model.block_size"):
        train_loader(data, block_size=16, batch_size=4, seed=0)


def test_csv_files_are_read_through_their_text_column(tmp_path, corpus):
    lines = corpus["train"].read_text().splitlines()
    table = tmp_path / "reviews.csv"
    table.write_text("id,body,stars\n" + "".join(f'{i},"{line}, said ""me""",5\n' for i, line in enumerate(lines)))
    cache = prepare_one(files_cfg(tmp_path, [table], text_column="body"))
    documents = cache.manifest["splits"]["train"]["documents"] + cache.manifest["splits"]["val"]["documents"]
    assert documents == len(lines)
    text = cache.tokenizer.decode(tokens(cache, "train")[:200].tolist())
    assert 'said "me"' in text and "stars" not in text
    with pytest.raises(DataError, match="data.text_column='text' is not a column"):
        prepare_one(files_cfg(tmp_path, [table]))


def test_an_hf_builder_reads_the_data_files_it_is_given(tmp_path, corpus):
    lines = corpus["train"].read_text().splitlines()
    table = tmp_path / "reviews.csv"
    table.write_text("body\n" + "".join(f"{line}\n" for line in lines))
    cfg = DataConfig(name="reviews", source=SourceKind.hf, path="csv", data_files=[str(tmp_path / "*.csv")],
                     text_column="body", cache_dir=str(tmp_path / "cache"))
    cache = prepare_one(cfg)
    assert cache.manifest["splits"]["train"]["documents"] + cache.manifest["splits"]["val"]["documents"] == len(lines)
    with pytest.raises(DataError, match=r"data.data_files: no file found at"):
        prepare_one(DataConfig(source=SourceKind.hf, path="csv", data_files=[str(tmp_path / "gone.csv")],
                               cache_dir=str(tmp_path / "cache")))


def test_data_files_belong_to_hf_builders_only(tmp_path, corpus):
    from lmtrain.config import validate_data
    from lmtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="data.data_files is for data=hf with a builder"):
        validate_data(files_cfg(tmp_path, [corpus["train"]], data_files=["a.csv"]))
