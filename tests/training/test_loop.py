"""The loop receives its parts built: a Trainer made from hand-made parts (no config composition, no data
preparation, no setup) trains, evaluates, logs and saves like one that `build_parts` assembled."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from lmtrain.config import (
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    Strategy,
    TrainConfig,
    TrainerConfig,
    as_plain_dict,
)
from lmtrain.data.loader import TrainLoader, eval_batches
from lmtrain.data.tokenizer import TextTokenizer, train_char
from lmtrain.distributed import strategies
from lmtrain.distributed.world import World
from lmtrain.model import GPT
from lmtrain.runs.checkpoint import read_config
from lmtrain.runs.metrics import MetricsLog, read_metrics
from lmtrain.training.debugging import StepProfiler
from lmtrain.training.divergence import DivergenceGuard
from lmtrain.training.early_stopping import EarlyStopping
from lmtrain.training.loop import Trainer
from lmtrain.training.memory import MicroBatches
from lmtrain.training.mfu import Mfu
from lmtrain.training.optim import build_optimizer
from lmtrain.training.precision import PrecisionChoice, TrainingPrecision
from lmtrain.training.setup import Parts
from lmtrain.training.state import Checkpointer

TEXT = "the quick brown fox jumps over the lazy dog; " * 300


def hand_made_parts(run_dir: Path, steps: int) -> Parts:
    device, batch, block = torch.device("cpu"), 8, 16
    torch.manual_seed(0)
    tokenizer = TextTokenizer(train_char(iter([TEXT])))
    tokens = np.array(tokenizer.encode(TEXT), dtype=np.uint16)
    train, val = tokens[: len(tokens) * 9 // 10], tokens[len(tokens) * 9 // 10:]
    trainer_cfg = TrainerConfig(max_steps=steps, batch_size=batch, eval_every=steps, log_every=1, save_every=0,
                                sample_every=0, eval_batches=2, progress=False, precision="fp32")
    model_cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layers=1, d_model=32, n_heads=2, d_ff=64,
                            block_size=block)
    cfg = TrainConfig(model=model_cfg, optimizer=OptimizerConfig(lr=3e-3),
                      scheduler=SchedulerConfig(warmup_steps=0), trainer=trainer_cfg)
    model = GPT(model_cfg)
    precision = TrainingPrecision(PrecisionChoice("fp32", "a test's choice"), device)
    world = World()
    return Parts(
        cfg=cfg, run_dir=run_dir, world=world, device=device, tokenizer=tokenizer, model_cfg=model_cfg, model=model,
        precision=precision, compiled=False, parallel=strategies.wrap(model, Strategy.single, device, False),
        optimizer=build_optimizer(model, cfg.optimizer, "cpu"),
        train_loader=TrainLoader([train], block, batch, seed=0), val_batches=eval_batches([val], block, batch, 2),
        total_steps=steps, mfu=Mfu(device, "fp32", model.flops_per_token()),
        metrics=MetricsLog(run_dir / "metrics.jsonl"), profiler=StepProfiler(0, run_dir, device),
        checkpoints=Checkpointer(run_dir, 1, as_plain_dict(dataclasses.replace(cfg, model=model_cfg)), tokenizer,
                                 world),
        divergence=DivergenceGuard(trainer_cfg, device), early_stopping=EarlyStopping(trainer_cfg.early_stopping),
        micro=MicroBatches(batch, batch, device), sample_prompts=[])


def test_a_trainer_built_from_hand_made_parts_trains_logs_and_saves(tmp_path):
    result = Trainer(hand_made_parts(tmp_path, steps=30)).fit()
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 30 and result.steps == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5  # it learned (seen: 3.30 -> 2.34)
    assert result.val_loss < losses[0]
    assert (tmp_path / "checkpoints" / "final" / "model.safetensors").is_file()
    assert read_config(tmp_path / "checkpoints" / "step_000030")["trainer"]["max_steps"] == 30
