"""trainer.compile=auto: off for a short run without measuring anything, on for a long run that the measured
speed-up repays, off when it would not; the measurement runs once per shape and leaves the model compiled."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from lmtrain.config import ModelConfig
from lmtrain.model import GPT
from lmtrain.training import compilation
from lmtrain.training.precision import PrecisionChoice, autocast_for

from conftest import make_trainer

CPU = torch.device("cpu")


@pytest.fixture
def fake_gain(monkeypatch):
    """cached_gain returns these figures (seconds) instead of compiling; the calls are counted."""
    gain = {"eager_step_s": 0.10, "compiled_step_s": 0.08, "compile_s": 30.0}
    calls = []
    monkeypatch.setattr(compilation, "cached_gain", lambda *args: calls.append(args) or gain)
    return gain, calls


def test_auto_leaves_a_20_step_run_eager_without_measuring(tmp_path, fake_gain, caplog):
    _, calls = fake_gain
    trainer = make_trainer(tmp_path, "trainer.max_steps=20")
    assert not trainer.compilation.on and trainer.model.compiled_blocks is None and calls == []
    assert trainer.compilation.reason.startswith("trainer.compile=auto: this run's 20 steps take about")
    assert "too short to repay compiling" in trainer.compilation.reason
    with caplog.at_level("INFO"):
        trainer._describe()
    assert "Compilation off: trainer.compile=auto: this run's 20 steps" in caplog.text


def test_auto_compiles_a_long_run_that_the_measured_speed_up_repays(tmp_path, fake_gain):
    gain, calls = fake_gain
    trainer = make_trainer(tmp_path, "trainer.max_steps=1000000")  # saves 1e6 x 0.02 s, far more than 30 s
    assert trainer.compilation.on and trainer.model.compiled_blocks is not None and len(calls) == 1
    assert "measured 1.25x eager's speed" in trainer.compilation.reason and "saves about" in trainer.compilation.reason


def test_auto_stays_eager_when_the_saving_is_smaller_than_the_compile_time(tmp_path, fake_gain, monkeypatch):
    gain, _ = fake_gain
    monkeypatch.setattr(compilation, "SHORT_RUN_SECONDS", 0.0)  # the tiny model's 1,000 steps are measured
    trainer = make_trainer(tmp_path, "trainer.max_steps=1000", "trainer.grad_accum_steps=1")
    assert not trainer.compilation.on  # 1,000 x 0.02 s = 20 s < 30 s of compiling
    assert "would save only about 20 s" in trainer.compilation.reason
    gain["compiled_step_s"] = 0.12  # compiled slower than eager: never on
    assert not make_trainer(tmp_path / "slower", "trainer.max_steps=1000000").compilation.on


def test_true_and_false_are_obeyed(tmp_path, fake_gain):
    assert make_trainer(tmp_path / "on", "trainer.max_steps=20", "trainer.compile=true").compilation.on
    assert not make_trainer(tmp_path / "off", "trainer.max_steps=10000000", "trainer.compile=false").compilation.on
    assert fake_gain[1] == []


def test_the_gain_is_measured_once_per_shape_and_leaves_the_model_compiled(monkeypatch, tmp_path):
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path))
    # dynamo's tracing with a fast backend: the figures' plumbing, not inductor's speed, is under test here
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, d_model=32, n_heads=2, n_layers=2, d_ff=64, block_size=16))
    autocast = functools.partial(autocast_for, CPU, PrecisionChoice("fp32", ""))
    expected = torch.rand(3)
    torch.manual_seed(0)
    GPT(ModelConfig(vocab_size=50, d_model=32, n_heads=2, n_layers=2, d_ff=64, block_size=16))
    gain = compilation.cached_gain(model, 4, CPU, "fp32", autocast)
    assert torch.equal(torch.rand(3), expected)  # the run's random numbers are untouched
    assert set(gain) == {"eager_step_s", "compiled_step_s", "compile_s"} and all(v > 0 for v in gain.values())
    assert model.compiled_blocks is not None and all(p.grad is None for p in model.parameters())
    stored = json.loads((tmp_path / compilation.CACHE_FILE).read_text())
    assert list(stored.values()) == [gain]
    model.uncompile()
    assert compilation.cached_gain(model, 4, CPU, "fp32", autocast) == gain  # from the cache
    assert model.compiled_blocks is None  # nothing was compiled again
    assert compilation.cached_gain(model, 8, CPU, "fp32", autocast) != gain  # another batch is another shape
    assert len(json.loads((tmp_path / compilation.CACHE_FILE).read_text())) == 2


def test_a_bad_setting_is_refused_naming_the_key(tmp_path):
    from conftest import run_cli

    result = run_cli("train", "trainer.compile=sometimes", cwd=tmp_path)
    assert result.returncode == 2
    assert "trainer.compile=sometimes must be true, false or auto" in result.stdout + result.stderr


def test_a_probe_that_runs_out_of_memory_measures_a_smaller_batch_and_scales_it(monkeypatch):
    tried = []

    def measure_at(model, batch, device, autocast):
        tried.append(batch)
        if batch > 2:
            raise torch.OutOfMemoryError("simulated")
        return {"eager_step_s": 0.5, "compiled_step_s": 0.25, "compile_s": 40.0}

    monkeypatch.setattr(compilation, "measure_at", measure_at)
    model = GPT(ModelConfig(vocab_size=50, d_model=32, n_heads=2, n_layers=1, d_ff=64, block_size=16))
    gain = compilation.measure_gain(model, 8, CPU, None)
    assert tried == [8, 4, 2]
    assert gain == {"eager_step_s": 2.0, "compiled_step_s": 1.0, "compile_s": 40.0}  # per pass of 8 sequences
