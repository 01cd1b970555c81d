"""Step checkpoints: what they hold, how resuming picks one, and the message for each broken case."""

import json
import logging
import os
import pickle
import random
import subprocess

import numpy as np
import pytest
import torch

from lmtrain.config import ModelConfig, OptimizerConfig
from lmtrain.data.loader import TrainLoader
from lmtrain.data.tokenizer import TextTokenizer, train_char
from lmtrain.errors import CheckpointError, DataError
from lmtrain.files import recover
from lmtrain.model import GPT
from lmtrain.runs.checkpoint import save_checkpoint
from lmtrain.runs.metrics import rewind
from lmtrain.training.optim import build_optimizer
from lmtrain.training.state import Checkpointer


class Parts:
    """A tiny model, its optimizer and a loader: what a Checkpointer saves and restores."""

    def __init__(self, d_model: int = 16):
        torch.manual_seed(0)
        self.model = GPT(ModelConfig(vocab_size=20, d_model=d_model, n_heads=2, n_layers=2, d_ff=32, block_size=8,
                                     dropout=0.1))
        self.optimizer = build_optimizer(self.model, OptimizerConfig(lr=1e-2), "cpu")
        self.loader = TrainLoader([np.arange(2000) % 20], block_size=8, batch_size=4, seed=1)
        self.batches = iter(self.loader)

    def train(self, steps: int) -> None:
        for _ in range(steps):
            x, y = next(self.batches)
            self.model(x, y).backward()
            self.optimizer.step()
            self.optimizer.zero_grad()

    def restore(self, checkpointer: Checkpointer, resume: str | None, init_from: str | None = None) -> dict | None:
        return checkpointer.start(resume, init_from, self.model, self.optimizer, self.loader)


@pytest.fixture
def tokenizer() -> TextTokenizer:
    return TextTokenizer(train_char(iter(["abcdef"])))


@pytest.fixture
def run(tmp_path, tokenizer):
    """A run dir with step checkpoints at steps 2 and 4 of the same training, and a checkpointer for it."""
    checkpointer = Checkpointer(tmp_path, keep_last=0, config={"model": {"d_model": 16}}, tokenizer=tokenizer)
    parts = Parts()
    for step in (2, 4):
        parts.train(2)
        checkpointer.save(parts.model, parts.optimizer, parts.loader, {"step": step})
    return checkpointer


def step_folder(checkpointer: Checkpointer, step: int):
    return checkpointer.root / f"step_{step:06d}"


def test_a_step_folder_holds_everything_and_latest_names_it(run):
    folder = step_folder(run, 4)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "rng_state.safetensors", "tokenizer.json",
        "trainer_state.json"]
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["loader"] == {"epoch": 0, "batch": 4}
    assert json.loads((run.root / "latest.json").read_text()) == {"step": 4, "folder": "step_000004"}
    assert sorted(p.name for p in run.root.iterdir()) == ["latest.json", "step_000002", "step_000004"]


def test_keep_last_deletes_the_oldest_step_folders(tmp_path, tokenizer):
    checkpointer = Checkpointer(tmp_path, keep_last=2, config={}, tokenizer=tokenizer)
    parts = Parts()
    for step in (1, 2, 3, 4):
        parts.train(1)
        checkpointer.save(parts.model, parts.optimizer, parts.loader, {"step": step})
    assert sorted(p.name for p in checkpointer.root.iterdir()) == ["latest.json", "step_000003", "step_000004"]


def test_resuming_restores_weights_optimizer_loader_and_every_rng(tmp_path, tokenizer):
    checkpointer = Checkpointer(tmp_path, keep_last=0, config={}, tokenizer=tokenizer)
    parts = Parts()
    parts.train(3)
    checkpointer.save(parts.model, parts.optimizer, parts.loader, {"step": 3, "custom": 1.5})
    after_save = (random.random(), np.random.rand(), torch.rand(3))
    parts.train(2)  # the uninterrupted run goes on: steps 4 and 5, with dropout
    expected = {k: v.clone() for k, v in parts.model.state_dict().items()}

    fresh = Parts()
    state = fresh.restore(checkpointer, "auto")
    assert state["step"] == 3 and state["custom"] == 1.5
    assert fresh.loader.state_dict() == {"epoch": 0, "batch": 3}
    assert (random.random(), np.random.rand()) == after_save[:2] and torch.equal(torch.rand(3), after_save[2])
    fresh.train(2)
    for name, value in fresh.model.state_dict().items():
        assert torch.equal(value, expected[name]), name


class PlantedPayload:
    """Unpickling this creates a marker file: the proof that pickled code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_planted_as_optimizer_state_is_refused_and_never_runs(run, tmp_path):
    proof = tmp_path / "proof_the_payload_is_live"
    pickle.loads(pickle.dumps(PlantedPayload(proof)))
    assert proof.exists()  # unpickled, it does run

    marker = tmp_path / "pwned"
    optimizer_file = step_folder(run, 4) / "optimizer.safetensors"
    for plant in (lambda f: f.write_bytes(pickle.dumps(PlantedPayload(marker))),
                  lambda f: torch.save({"state": PlantedPayload(marker)}, f)):  # a torch.save archive
        plant(optimizer_file)
        with pytest.raises(CheckpointError, match="optimizer.safetensors is corrupt or truncated, or not a "
                                                  "safetensors file"):
            Parts().restore(run, str(step_folder(run, 4)))
        assert not marker.exists()
    state = Parts().restore(run, "auto")  # auto falls back to the previous checkpoint, still running nothing
    assert state["step"] == 2 and not marker.exists()


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.safetensors", "rng_state.safetensors",
                                  "trainer_state.json", "config.json"])
def test_a_truncated_file_is_named_and_auto_falls_back_to_the_previous_checkpoint(run, file, caplog):
    damaged = step_folder(run, 4) / file
    damaged.write_bytes(damaged.read_bytes()[:damaged.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"trainer.resume=.*step_000004: .*step_000004/{file} is corrupt"):
        Parts().restore(run, str(step_folder(run, 4)))
    with caplog.at_level(logging.INFO):
        state = Parts().restore(run, "auto")
    assert state["step"] == 2
    assert f"Cannot resume from step_000004: {damaged} is corrupt" in caplog.text
    assert "Falling back to step_000002, the newest checkpoint that reads whole" in caplog.text
    assert "Resuming from" in caplog.text and "step_000002 at step 2" in caplog.text


def test_a_missing_file_is_named(run):
    (step_folder(run, 4) / "rng_state.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"step_000004/rng_state.safetensors is missing"):
        Parts().restore(run, str(step_folder(run, 4)))


def test_corrupt_trainer_state_json_is_named(run):
    (step_folder(run, 4) / "trainer_state.json").write_text('{"step": 4, "loader"')
    with pytest.raises(CheckpointError, match=r"step_000004/trainer_state.json is corrupt: Expecting"):
        Parts().restore(run, str(step_folder(run, 4)))
    (step_folder(run, 4) / "trainer_state.json").write_text('{"step": "four"}')
    with pytest.raises(CheckpointError, match=r"trainer_state.json is corrupt: it has no step or loader position"):
        Parts().restore(run, str(step_folder(run, 4)))


def test_another_model_shape_lists_the_mismatched_names_and_shapes(run):
    with pytest.raises(CheckpointError, match=r"does not fit this model \(\d+ mismatches\): .*"
                                              r"tok_emb.weight: checkpoint \(20, 16\) vs model \(20, 32\)"):
        Parts(d_model=32).restore(run, "auto")


def test_when_no_checkpoint_reads_auto_stops_and_lists_each_problem(run):
    for step in (2, 4):
        (step_folder(run, step) / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be read: .*step_000004/model.safetensors is "
                                              r"corrupt.*; .*step_000002/model.safetensors is corrupt"):
        Parts().restore(run, "auto")


def test_auto_with_nothing_to_resume_starts_fresh_and_says_so(tmp_path, tokenizer, caplog):
    # An earlier attempt logged two steps, then died before its first checkpoint.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.9}\n')
    checkpointer = Checkpointer(tmp_path, keep_last=0, config={}, tokenizer=tokenizer)
    parts = Parts()
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    with caplog.at_level(logging.INFO):
        assert parts.restore(checkpointer, "auto") is None
    assert "trainer.resume=auto: no checkpoint in" in caplog.text and "yet; starting fresh" in caplog.text
    assert "Dropped 2 records from metrics.jsonl" in caplog.text
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    assert all(torch.equal(v, before[k]) for k, v in parts.model.state_dict().items())


def test_init_from_loads_the_weights_only(run, tmp_path, caplog):
    trained = Parts()
    trained.train(3)
    final = save_checkpoint(tmp_path / "final", trained.model, {}, run.tokenizer)
    fresh = Parts()
    with caplog.at_level(logging.INFO):
        assert fresh.restore(Checkpointer(tmp_path / "new_run", 0, {}, run.tokenizer), None, str(final)) is None
    for name, value in fresh.model.state_dict().items():
        assert torch.equal(value, trained.model.state_dict()[name]), name
    assert fresh.optimizer.state_dict()["state"] == {} and fresh.loader.state_dict() == {"epoch": 0, "batch": 0}
    assert "Initialized the weights from" in caplog.text and "the optimizer starts fresh" in caplog.text
    with pytest.raises(CheckpointError, match=r"model.init_from=.*final: .*tok_emb.weight: checkpoint \(20, 16\) "
                                              r"vs model \(20, 32\)"):
        Parts(d_model=32).restore(Checkpointer(tmp_path / "other", 0, {}, run.tokenizer), None, str(final))


def test_a_weights_only_folder_given_to_resume_points_to_init_from(run, tmp_path):
    final = save_checkpoint(tmp_path / "final", Parts().model, {}, run.tokenizer)
    with pytest.raises(CheckpointError, match=r"holds weights only, no training state to resume; to start from these "
                                              r"weights with a fresh optimizer, use model.init_from="):
        Parts().restore(run, str(final))


def test_latest_json_decides_and_a_newer_unfinished_folder_is_ignored(run, caplog):
    (run.root / "latest.json").write_text('{"step": 2, "folder": "step_000002"}')  # killed before the pointer moved
    with caplog.at_level(logging.INFO):
        assert Parts().restore(run, "auto")["step"] == 2
    assert "Ignoring step_000004: its save never finished" in caplog.text
    (run.root / "latest.json").write_text("{broken")
    with caplog.at_level(logging.INFO):
        assert Parts().restore(run, "auto")["step"] == 4
    assert "latest.json is corrupt" in caplog.text


def test_recover_restores_a_folder_moved_aside_and_clears_scratch_but_not_a_live_processs(run):
    root = run.root
    ended = subprocess.Popen(["true"])
    ended.wait()
    dead = ended.pid  # the PID of a process killed mid-save
    os.replace(root / "step_000004", root / f".step_000004.old{dead}")  # killed between the two renames
    (root / f".step_000006.tmp{dead}").mkdir()  # killed while writing
    (root / f".latest.json.tmp{dead}").write_text("{")
    os.replace(root / "step_000002", root / f".step_000002.trash{dead}")  # killed while deleting
    with subprocess.Popen(["sleep", "30"]) as alive:  # another process, saving into this folder right now
        (root / f".step_000008.tmp{alive.pid}").mkdir()
        recover(root)
        alive.kill()
    assert sorted(p.name for p in root.iterdir()) == [f".step_000008.tmp{alive.pid}", "latest.json", "step_000004"]


def test_rewind_cuts_metrics_back_to_a_saved_length(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    assert rewind(path, len('{"step": 1}\n')) == 2
    assert path.read_text() == '{"step": 1}\n'
    assert rewind(path, 100) == 0 and rewind(tmp_path / "absent.jsonl", 0) == 0


def test_a_checkpoint_trained_with_another_tokenizer_is_refused(run, tmp_path):
    final = save_checkpoint(tmp_path / "final", Parts().model, {}, run.tokenizer)
    other = TextTokenizer(train_char(iter(["uvwxyz"])))  # what this run's data was tokenized with
    with pytest.raises(DataError, match=r"model.init_from=.*final: its model was trained with another tokenizer than "
                                        r"the one this run's data was tokenized with .*; tokenize with the "
                                        r"checkpoint's own: tokenizer=file tokenizer.path=.*final/tokenizer.json"):
        Parts().restore(Checkpointer(tmp_path / "new_run", 0, {}, other), None, str(final))
    with pytest.raises(DataError, match=r"trainer.resume=auto: its model was trained with another tokenizer"):
        Parts().restore(Checkpointer(run.root.parent, 0, {}, other), "auto")
