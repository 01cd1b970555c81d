"""Data that is large, malformed or damaged: long files in pieces, encoding errors, bad records, caches that heal."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from lmtrain.config import DataConfig, EncodingErrors, SourceKind, TokenizerConfig, TokenizerKind
from lmtrain.data import cache as cache_module
from lmtrain.data import text_files
from lmtrain.data.prepare import prepare_data
from lmtrain.data.text_files import jsonl_records, text_pieces
from lmtrain.errors import DataError

CHAR = TokenizerConfig(kind=TokenizerKind.char)


def files_cfg(tmp_path, train, **kw) -> DataConfig:
    return DataConfig(name="test", source=SourceKind.text_files, train_files=[str(p) for p in train],
                      cache_dir=str(tmp_path / "cache"), **kw)


def prepare_one(cfg: DataConfig):
    (cache,) = prepare_data(cfg, CHAR).caches.values()
    return cache


def all_tokens(cache) -> np.ndarray:
    return np.concatenate([np.asarray(s) for split in ("train", "val") for s in cache.shards(split)])


def test_one_long_line_comes_in_bounded_pieces_cut_before_spaces(tmp_path, monkeypatch):
    monkeypatch.setattr(text_files, "PIECE_BYTES", 1000)
    words = "één twee drie vier " * 5000  # one line, two-byte characters that a cut must not split
    file = tmp_path / "line.txt"
    file.write_text(words)
    pieces = list(text_pieces(file, "strict"))
    assert "".join(pieces) == words and len(pieces) > 90
    assert max(len(p.encode()) for p in pieces) <= 2000
    assert all(p.startswith(" ") for p in pieces[1:])  # " word" stays whole for byte-level BPE
    unbroken = tmp_path / "unbroken.txt"
    unbroken.write_text("é" * 3000)  # no space at all: cut anywhere, but never inside a character
    assert "".join(text_pieces(unbroken, "strict")) == "é" * 3000


def test_a_long_file_is_one_document_with_one_end_of_text(tmp_path, monkeypatch, corpus):
    monkeypatch.setattr(text_files, "PIECE_BYTES", 512)
    cache = prepare_one(files_cfg(tmp_path, [corpus["train"], corpus["val"]]))
    ids = all_tokens(cache)
    assert (ids == cache.tokenizer.eot_id).sum() == 2  # two files, each closed once, however many pieces
    text = corpus["train"].read_text() + corpus["val"].read_text()
    assert cache.tokenizer.decode(ids[ids != cache.tokenizer.eot_id]) == text


def test_bytes_that_are_not_utf8_name_the_file_and_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(text_files, "PIECE_BYTES", 4)  # the bad byte lies in a later piece than the first
    file = tmp_path / "latin1.txt"
    file.write_bytes(b"caf" + b" na\xefve text\n" * 3)
    message = r"latin1.txt is not UTF-8 text: byte 6 \(0xef\).*data.encoding_errors=replace"  # "caf na" is 6 bytes
    with pytest.raises(DataError, match=message):
        list(text_pieces(file, "strict"))
    assert "na\ufffdve" in "".join(text_pieces(file, "replace"))
    cache = prepare_one(files_cfg(tmp_path, [file], encoding_errors=EncodingErrors.replace))
    assert "\ufffd" in cache.tokenizer.decode(all_tokens(cache))


def test_bad_jsonl_records_name_file_and_line_or_are_skipped_and_counted(tmp_path, caplog):
    file = tmp_path / "docs.jsonl"
    file.write_text('{"text": "a good one"}\n{"text": "cut off\n{"text": null}\n{"text": 42}\n[1, 2]\n'
                    '{"text": "another good one"}\n')
    with pytest.raises(DataError, match=r"docs.jsonl, line 2: not valid JSON.*data.skip_bad_records=true"):
        list(jsonl_records([str(file)], "text", "strict", skip_bad=False, max_documents=None))
    file.write_text('{"text": "a good one"}\n{"text": null}\n')
    with pytest.raises(DataError, match=r"docs.jsonl, line 2: its 'text' is null, not a string"):
        list(jsonl_records([str(file)], "text", "strict", skip_bad=False, max_documents=None))
    file.write_text('{"text": "a good one"}\n{"text": "cut off\n{"text": null}\n{"text": 42}\n[1, 2]\n'
                    '{"text": "another good one"}\n')
    with caplog.at_level(logging.WARNING):
        records = list(jsonl_records([str(file)], "text", "strict", skip_bad=True, max_documents=None))
    assert [r["text"] for r in records] == ["a good one", "another good one"]
    assert "Skipped 4 bad records in" in caplog.text and "line 2: not valid JSON" in caplog.text


def _damage_shard(cache) -> None:
    shard = cache.path / cache.manifest["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:10])


def _first_shard(cache):
    return cache.path / cache.manifest["splits"]["train"]["shards"][0]["file"]


def _random_bytes_in_a_shard(cache) -> None:
    shard = _first_shard(cache)
    shard.write_bytes(os.urandom(shard.stat().st_size))  # same size: only the content tells


def _ids_in_range_but_changed(cache) -> None:
    shard = _first_shard(cache)
    ids = np.fromfile(shard, dtype=cache.manifest["dtype"])
    np.roll(ids, 1).tofile(shard)  # every id still in the vocabulary: the checksum tells


def _damage_manifest(cache) -> None:
    (cache.path / "manifest.json").write_text('{"format": 2, "dtyp')


def _edit_manifest(cache) -> None:
    manifest = json.loads((cache.path / "manifest.json").read_text())
    manifest["splits"]["train"]["tokens"] += 1000
    (cache.path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", [_damage_shard, _random_bytes_in_a_shard, _ids_in_range_but_changed,
                                    _damage_manifest, _edit_manifest])
def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path, corpus, caplog, damage):
    cfg = files_cfg(tmp_path, [corpus["train"]])
    first = prepare_one(cfg)
    expected = all_tokens(first).copy()
    damage(first)
    with caplog.at_level(logging.WARNING):
        again = prepare_one(cfg)
    assert "The token cache is damaged" in caplog.text and str(first.path) in caplog.text
    assert again.path == first.path and np.array_equal(all_tokens(again), expected)


def test_shards_are_read_again_only_when_they_changed_or_verify_asks(tmp_path, corpus, monkeypatch, caplog):
    cfg = files_cfg(tmp_path, [corpus["train"]], val_files=[str(corpus["val"])])
    first = prepare_one(cfg)
    assert sorted(first.manifest["checksums"]) == sorted(p.name for p in first.path.glob("*.bin"))
    reads = []
    digest = cache_module.shard_digest
    monkeypatch.setattr(cache_module, "shard_digest", lambda f, *a: reads.append(f.name) or digest(f, *a))
    prepare_one(cfg)
    assert reads == []  # verified when written, unchanged since
    shard = _first_shard(first)
    before = shard.stat()
    ids = np.fromfile(shard, dtype=first.manifest["dtype"])
    np.roll(ids, 1).tofile(shard)  # silent corruption (bit rot): same size, same modification time
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    prepare_one(cfg)
    assert reads == []
    with caplog.at_level(logging.WARNING):
        prepare_data(cfg, CHAR, verify=True)  # `lmtrain prepare verify=true` reads every shard
    assert "does not match the checksum manifest.json records" in caplog.text and shard.name in reads


def test_a_cache_made_before_checksums_gets_them_once_its_ids_are_checked(tmp_path, corpus, caplog):
    cfg = files_cfg(tmp_path, [corpus["train"]])
    first = prepare_one(cfg)
    old = {k: v for k, v in first.manifest.items() if k not in ("checksums", "checksum")}
    (first.path / "manifest.json").write_text(json.dumps({**old, "checksum": cache_module._checksum(old)}))
    (first.path / "verified.json").unlink()
    with caplog.at_level(logging.INFO):
        again = prepare_one(cfg)
    assert "Recorded the checksums of the shards" in caplog.text and "damaged" not in caplog.text
    assert again.manifest["checksums"] == first.manifest["checksums"]
    assert json.loads((first.path / "manifest.json").read_text())["checksums"] == first.manifest["checksums"]
    (first.path / "manifest.json").write_text(json.dumps({**old, "checksum": cache_module._checksum(old)}))
    shard = _first_shard(first)
    np.full(shard.stat().st_size // 2, 60000, dtype=np.uint16).tofile(shard)  # ids no char tokenizer has
    with pytest.raises(cache_module.DamagedCache, match=r"holds token id 60,000, outside the vocabulary of"):
        cache_module.open_cache(first.path)


def test_a_damaged_prepared_cache_names_the_folder(tmp_path, corpus):
    built = prepare_one(files_cfg(tmp_path, [corpus["train"]]))
    _damage_shard(built)
    cfg = DataConfig(name="given", source=SourceKind.prepared, path=str(built.path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=f"damaged token cache .*delete {built.path}"):
        prepare_data(cfg, CHAR)


def test_a_folder_in_train_files_suggests_its_files(tmp_path):
    from lmtrain.data.sources import expand_files

    with pytest.raises(DataError, match=rf"data.train_files: '{tmp_path}' is a folder; .*\[{tmp_path}/\*.txt\]"):
        expand_files([str(tmp_path)], "data.train_files")


@pytest.mark.parametrize("streaming", [True, False])
def test_a_local_dataset_whose_files_disagree_on_columns_is_one_line_without_network_advice(tmp_path, streaming):
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(150)))
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": f"more {i}", "extra": i}) + "\n" for i in range(150)))
    cfg = DataConfig(name="local", source=SourceKind.hf, path=str(folder), streaming=streaming,
                     cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as error:
        prepare_data(cfg, CHAR)
    message = str(error.value)
    assert message.startswith(f"data.path={str(folder)!r}: its data files do not all have the same columns")
    assert "extra: int64" in message and "network" not in message and "\n" not in message
