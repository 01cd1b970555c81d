"""`lmtrain generate`, `lmtrain eval` and `lmtrain export` end to end through the real CLI, on a tiny model
trained once for this module (char tokenizer, so every byte count is known), plus samples during training."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest
from safetensors.torch import load_file

from lmtrain.runs.metrics import read_metrics

from conftest import FAST_TRAIN, TINY_MODEL, run_cli

pytestmark = pytest.mark.slow

WORDS = "the quick brown fox jumps over the lazy dog while a small bird sings in the old tree".split()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory of a 40-step training with samples every 20 steps; its val.txt is pure ASCII."""
    root = tmp_path_factory.mktemp("use")
    lines = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(400)]
    (root / "train.txt").write_text("\n".join(lines[:360]) + "\n")
    (root / "val.txt").write_text("\n".join(lines[360:]) + "\n")
    result = run_cli("train", *TINY_MODEL, *FAST_TRAIN, "data=text_files", f"data.train_files=[{root / 'train.txt'}]",
                     f"data.val_files=[{root / 'val.txt'}]", "tokenizer=char", "trainer.max_steps=40",
                     "optimizer.lr=3e-3", "scheduler.warmup_steps=5", "trainer.eval_every=20",
                     "trainer.sample_every=20", "trainer.sample_prompts=['the ','']", "trainer.sample_tokens=12",
                     "model.vocab_multiple=64",  # generate, eval and export all meet vocabulary padding
                     f"hydra.run.dir={root / 'run'}")
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "run"


def test_training_writes_samples_to_the_log_and_metrics(run):
    samples = [r for r in read_metrics(run / "metrics.jsonl") if "samples" in r]
    assert [r["step"] for r in samples] == [20, 40]
    for record in samples:
        assert len(record["samples"]) == 2 and record["samples"][0].startswith("the ")
        assert len(record["samples"][0]) <= len("the ") + 12
    assert "Step 20, sample: 'the " in (run / "train.log").read_text()


def test_generate_streams_the_text_alone_on_stdout_and_greedy_repeats(run, tmp_path):
    args = ["generate", f"checkpoint={run}", "prompt=the quick", "temperature=0", "max_new_tokens=6"]
    first, second = run_cli(*args, cwd=tmp_path), run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("the quick")
    assert len(first.stdout) <= len("the quick") + 6 + 1  # six characters at most, then a newline
    assert "stopped at max_new_tokens=6" in first.stderr or "stopped at end of text" in first.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/, .hydra/ or log file left behind


def test_generate_draws_several_samples(run):
    result = run_cli("generate", f"checkpoint={run}", "prompt=the", "num_samples=3", "top_k=5", "top_p=0.9",
                     "temperature=1.0", "max_new_tokens=8", "seed=3")
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("--- sample")] == [
        "--- sample 1/3 ---", "--- sample 2/3 ---", "--- sample 3/3 ---"]


def test_a_prompt_longer_than_the_context_is_noted_and_cut(run):
    result = run_cli("generate", f"checkpoint={run}", f"prompt={' '.join(WORDS)}", "max_new_tokens=100")
    assert result.returncode == 0, result.stderr
    assert "more than the model's context of 16 (model.block_size): generating from its last 8 tokens" in result.stderr
    assert "the window slid: each later token saw only the 16 before it" in result.stderr or (
        "stopped at end of text" in result.stderr)


def test_interactive_reads_prompts_until_end_of_input(run):
    result = run_cli("generate", f"checkpoint={run}", "interactive=true", "temperature=0", "max_new_tokens=3",
                     input="the\nfox €\nlazy\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("the") and lines[1].startswith("lazy")
    assert "'fox €': the characters ['€'] are not in the tokenizer's vocabulary" in result.stderr


@pytest.mark.parametrize("override, message", [
    ("checkpoint=/no/such/run", "checkpoint=/no/such/run: no such directory"),
    ("top_p=1.5", "top_p=1.5 must be in (0, 1]"),
    ("top_p=0", "top_p=0.0 must be in (0, 1]"),
    ("prompt=the €uro (x)", "prompt='the €uro (x)': the characters ['(', ')', '€'] are not in the tokenizer's"),
])
def test_user_mistakes_are_one_clear_line(run, override, message):
    result = run_cli("generate", f"checkpoint={run}", override)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr + result.stdout


def test_eval_scores_the_training_data_split_and_writes_json(run, tmp_path):
    result = run_cli("eval", f"checkpoint={run}", "batch_size=4", "out=scores/val.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "scores/val.json").read_text())
    val_text = (run.parent / "val.txt").read_text()
    # val.txt is one document: its characters, then end-of-text; all tokens but the first are scored
    assert report["tokens"] == len(val_text) and report["bytes"] == len(val_text) - 1
    assert report["split"] == "val" and report["data"] == "text_files"
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    nll = report["loss"] * report["tokens"]
    assert report["bits_per_byte"] == pytest.approx(nll / (math.log(2) * report["bytes"]))
    vocab = json.loads((run / "checkpoints/final/config.json").read_text())["model"]["vocab_size"]
    assert report["loss"] < 0.8 * math.log(vocab)  # it learned something
    val_loss = [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r][-1]
    assert report["loss"] == pytest.approx(val_loss, rel=0.1)  # training saw a sample of the same windows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores"]

    capped = run_cli("eval", f"checkpoint={run}", "split=train", "max_tokens=50", f"out={tmp_path / 'train.json'}")
    assert capped.returncode == 0, capped.stderr
    assert json.loads((tmp_path / "train.json").read_text())["tokens"] == 50


def test_eval_writes_beside_the_checkpoint_it_scored_and_says_when_it_replaces_results(run, tmp_path):
    first = run_cli("eval", f"checkpoint={run}", "max_tokens=50", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (written,) = run.glob("checkpoints/*/eval_val.json")
    assert json.loads(written.read_text())["checkpoint"] == str(written.parent.resolve())
    assert list(tmp_path.iterdir()) == []  # nothing in the working folder
    assert "Replacing" not in first.stderr
    again = run_cli("eval", f"checkpoint={run}", "max_tokens=60", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"Replacing the earlier results in {written}" in again.stderr
    assert json.loads(written.read_text())["tokens"] == 60
    written.unlink()  # the module's run stays as the other tests expect it


def test_export_loads_in_transformers_and_continues_text_as_lmtrain_does(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    result = run_cli("export", f"checkpoint={run}", "format=hf", f"out={out}")
    assert result.returncode == 0, result.stderr
    assert "GPT2LMHeadModel" in result.stderr
    umask = os.umask(0o022)
    os.umask(umask)
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o666 & ~umask}  # not safetensors' 0600
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    saved = load_file(str(run / "checkpoints/final/model.safetensors"))["tok_emb.weight"]
    assert saved.shape[0] == 64 and model.config.vocab_size == len(tokenizer) < 64  # the padding stays behind
    ids = tokenizer("the lazy", return_tensors="pt")["input_ids"]
    theirs = tokenizer.decode(model.generate(ids, max_new_tokens=6, do_sample=False)[0], skip_special_tokens=True)
    ours = run_cli("generate", f"checkpoint={run}", "prompt=the lazy", "temperature=0", "max_new_tokens=6")
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.rstrip("\n") == theirs
