"""`lmtrain prepare` and the data paths of `lmtrain train` through the real CLI: cache reuse, streaming, mixtures."""

import json
import os

import datasets
import pytest

from lmtrain.runs.metrics import read_metrics

from conftest import FAST_TRAIN, TINY_MODEL, run_cli

pytestmark = pytest.mark.slow

# FAST_TRAIN without its data keys, which would change which cache a run uses.
SHORT_RUN = [*TINY_MODEL, *[a for a in FAST_TRAIN if not a.startswith("data.")], "trainer.max_steps=4",
             "trainer.eval_every=2", "trainer.sample_every=0"]


def test_prepare_then_train_reuses_the_cache_and_another_tokenizer_rebuilds(tmp_path, corpus):
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    env = {"LMTRAIN_CACHE": str(cache)}
    data = ["data=text_files", f"data.train_files=[{corpus['train']}]", f"data.val_files=[{corpus['val']}]"]

    prepared = run_cli("prepare", *data, "tokenizer=char", cwd=work, env=env)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    (folder,) = (cache / "data").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    train_tokens = manifest["splits"]["train"]["tokens"]
    assert train_tokens == len(corpus["train"].read_text()) + 1  # one token per character, plus end-of-text
    for shown in ("Prepared data", f"{train_tokens:,}", "tokens/s", "on disk", str(folder)):
        assert shown in prepared.stdout, prepared.stdout
    assert list(work.iterdir()) == []  # no run directory, no log file

    run = tmp_path / "run"
    trained = run_cli("train", *data, "tokenizer=char", *SHORT_RUN, f"hydra.run.dir={run}", env=env)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert f"Using tokenized text_files from {folder}" in trained.stdout and "Tokenizing" not in trained.stdout
    assert json.loads((folder / "manifest.json").read_text()) == manifest and len(list((cache / "data").iterdir())) == 1
    assert (run / "checkpoints/final/tokenizer.json").read_text() == (folder / "tokenizer.json").read_text()

    # The folder itself, given as data: this run's tokenizer settings must be the ones it was built with.
    refused = run_cli("train", "data.source=prepared", f"data.path={folder}", *SHORT_RUN,
                      f"hydra.run.dir={tmp_path / 'refused'}", env=env)
    assert refused.returncode == 2 and "Traceback" not in refused.stdout + refused.stderr
    assert f"data.path='{folder}' was built with another tokenizer (kind=char)" in refused.stdout

    rebuilt = run_cli("train", *data, "tokenizer=bpe", *SHORT_RUN, f"hydra.run.dir={tmp_path / 'run2'}", env=env)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "Tokenizing text_files into" in rebuilt.stdout and len(list((cache / "data").iterdir())) == 2


def test_a_streamed_dataset_trains_without_being_materialized(tmp_path):
    folder = tmp_path / "dataset" / "data"
    folder.mkdir(parents=True)
    words = "a streamed corpus is read record by record and never converted or held whole".split()
    for shard in range(4):
        lines = [json.dumps({"text": " ".join(words[(shard + i + j) % len(words)] for j in range(30))})
                 for i in range(300)]
        (folder / f"train-{shard:05d}.jsonl").write_text("\n".join(lines) + "\n")
    hf_cache = tmp_path / "hf"
    run = tmp_path / "run"
    result = run_cli("train", "data=hf", f"data.path={folder.parent}", "data.streaming=true", "data.max_tokens=20000",
                     "tokenizer=char", *SHORT_RUN, f"hydra.run.dir={run}", env={"HF_DATASETS_CACHE": str(hf_cache)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    (manifest,) = [json.loads(p.read_text()) for p in (tmp_path.parent.glob("**/manifest.json"))
                   if json.loads(p.read_text())["source"]["path"] == str(folder.parent)]
    assert manifest["splits"]["train"]["tokens"] == 20000 and manifest["splits"]["val"]["tokens"] == 1000
    assert not list(hf_cache.rglob("*.arrow"))  # no Arrow copy of the corpus: it was only streamed
    datasets.load_dataset(str(folder.parent), cache_dir=str(tmp_path / "hf2"))  # the non-streaming way makes one
    assert list((tmp_path / "hf2").rglob("*.arrow"))


def test_a_mixture_trains_by_weight_and_reports_tokens_per_source(tmp_path, corpus):
    run = tmp_path / "run"
    result = run_cli("train", "data=code_and_prose", "data.mixture.0.max_documents=30",
                     f"data.mixture.1.train_files=[{corpus['train']}]", "tokenizer=char", *SHORT_RUN,
                     "trainer.max_steps=6", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Mixture: code 70%" in result.stdout
    drawn = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if "tokens from" in line}
    assert set(drawn) == {"tokens from code", "tokens from prose"}
    assert "weight 70%" in drawn["tokens from code"] and "weight 30%" in drawn["tokens from prose"]
    assert any("val_loss" in r for r in read_metrics(run / "metrics.jsonl"))


def test_a_data_mistake_is_one_line_without_traceback(tmp_path):
    result = run_cli("prepare", "data=text_files", f"data.train_files=[{tmp_path / 'nowhere.txt'}]", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output
    assert f"data.train_files: no file found at '{tmp_path / 'nowhere.txt'}'" in output


def test_random_bytes_in_a_shard_are_found_and_rebuilt_before_training(tmp_path, corpus):
    cache, env = tmp_path / "cache", {"LMTRAIN_CACHE": str(tmp_path / "cache")}
    data = ["data=text_files", f"data.train_files=[{corpus['train']}]", f"data.val_files=[{corpus['val']}]",
            "tokenizer=char"]
    prepared = run_cli("prepare", *data, cwd=tmp_path, env=env)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    (folder,) = (cache / "data").iterdir()
    shard = folder / "train-00000.bin"
    shard.write_bytes(os.urandom(shard.stat().st_size))  # same size: the manifest's sizes cannot tell

    trained = run_cli("train", *data, *SHORT_RUN, f"hydra.run.dir={tmp_path / 'run'}", env=env)
    out = trained.stdout + trained.stderr
    assert trained.returncode == 0, out
    assert "The token cache is damaged" in out and "train-00000.bin" in out and "rebuilding it" in out
    assert "Traceback" not in out and "IndexError" not in out
    verified = run_cli("prepare", *data, "verify=true", cwd=tmp_path, env=env)
    assert verified.returncode == 0 and "Verified the 2 shards of" in verified.stdout + verified.stderr
