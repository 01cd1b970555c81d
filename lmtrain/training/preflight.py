"""Checks before the first step: what needs no data runs before tokenizing, and settings that would waste a
run are named before it starts.

- `init_from_checked` (before any data is read): a `model.init_from` checkpoint's tokenizer becomes the run's,
  and its tensor names and shapes must fit the configured model; both are read from its files alone.
- `resume_checked` (before any data is read): a `trainer.resume=PATH` step folder holds a training state.
- `warn_before_training` (once the model is built): a step that would take very long on this device, a warm-up
  that never ends, evaluations, checkpoints or samples that a short run never reaches.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from lmtrain.config import TokenizerConfig, TokenizerKind, TrainConfig
from lmtrain.data.tokenizer import TextTokenizer, same_tokenizer
from lmtrain.errors import CheckpointError, DataError
from lmtrain.runs.checkpoint import TOKENIZER, WEIGHTS, check_shapes
from lmtrain.training.eta import duration
from lmtrain.training.optim import lr_at
from lmtrain.training.state import TrainingCheckpoint

log = logging.getLogger(__name__)

SLOW_STEP_SECONDS = 10.0  # an estimated step longer than this, at the device's peak, gets a warning


def init_from_checked(cfg: TrainConfig, vocab_multiple: int | None = None) -> TrainConfig:
    """The config to train with: with `model.init_from`, the data is tokenized with the checkpoint's own
    tokenizer.json (a model knows only the ids it was trained with), and its weights must fit the model.
    Both are checked from the checkpoint's files before anything is tokenized. vocab_multiple: the embedding
    rows' padding the run will use (model.vocab_multiple as the trainer resolves it for its device)."""
    if cfg.model.init_from is None:
        return cfg
    key = f"model.init_from={cfg.model.init_from}"
    folder = Path(cfg.model.init_from).expanduser()
    for name in (TOKENIZER, WEIGHTS):
        if not (folder / name).is_file():
            raise CheckpointError(f"{key} is not a checkpoint folder: it has no {name}")
    saved = TextTokenizer.load(folder / TOKENIZER)
    if cfg.tokenizer.kind == TokenizerKind.file:
        if not same_tokenizer(TextTokenizer.load(Path(cfg.tokenizer.path).expanduser()), saved):
            raise DataError(f"{key}: its model was trained with another tokenizer than tokenizer.path="
                            f"{cfg.tokenizer.path}; use the checkpoint's own: tokenizer.path={folder / TOKENIZER}")
    else:
        log.info("model.init_from: tokenizing the data with the checkpoint's own tokenizer, %s (%s tokens)",
                 folder / TOKENIZER, f"{saved.vocab_size:,}")
        cfg = dataclasses.replace(cfg, tokenizer=TokenizerConfig(kind=TokenizerKind.file, path=str(folder / TOKENIZER)))
    model_cfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or saved.vocab_size,
                                    vocab_multiple=vocab_multiple or cfg.model.vocab_multiple)
    try:
        check_shapes(expected_shapes(model_cfg), saved_shapes(folder / WEIGHTS), folder / WEIGHTS)
    except CheckpointError as e:
        raise CheckpointError(f"{key}: {e}") from None
    return cfg


def resume_checked(resume: str | None) -> None:
    """trainer.resume=PATH must name a step folder (checked from its trainer_state.json, no tensor read), so a
    wrong path fails before any data is read, and before the run folder holds a run's files."""
    if resume in (None, "auto"):
        return
    try:
        TrainingCheckpoint.state_of(Path(resume).expanduser())
    except CheckpointError as e:
        raise CheckpointError(f"trainer.resume={resume}: {e}") from None


def expected_shapes(model_cfg) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the weights a checkpoint of this model holds (a tied weight once), computed on the
    meta device: no memory, no time, whatever the model's size."""
    from lmtrain.model import GPT

    with torch.device("meta"):
        model = GPT(model_cfg)
    params = dict(model.named_parameters())  # a tied weight once, under its first name, as checkpoints save it
    every_param = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k in params or k not in every_param}


def saved_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """A safetensors file's tensor names and shapes, from its header alone."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{file} is corrupt or truncated, or not a safetensors file: {e}") from None


def warn_before_training(cfg: TrainConfig, total_steps: int, tokens_per_step: int, flops_per_token: float,
                         peak_flops: float, device: torch.device) -> list[str]:
    """Log (and return) a warning for each setting that makes this run slow beyond reason or partly pointless."""
    t, s = cfg.trainer, cfg.scheduler
    warnings = []
    step_seconds = flops_per_token * tokens_per_step / peak_flops  # a lower bound: the device at its peak
    if step_seconds >= SLOW_STEP_SECONDS:
        warnings.append(
            f"Each step needs {flops_per_token * tokens_per_step:.2e} FLOPs: at least {duration(step_seconds)} on "
            f"{device} at its peak of {peak_flops / 1e12:.2f} TFLOP/s, so {total_steps:,} steps take at least "
            f"{duration(step_seconds * total_steps)}. For a first try, use a smaller model (model.*), a smaller "
            "trainer.batch_size or model.block_size, or a GPU")
    if s.warmup_fraction is None and s.warmup_steps >= total_steps and s.warmup_steps > 0:
        last = lr_at(total_steps - 1, total_steps, cfg.optimizer.lr, s)
        warnings.append(
            f"scheduler.warmup_steps={s.warmup_steps} >= the run's {total_steps} steps: the learning rate only "
            f"climbs and ends at {last:.2e}, never reaching optimizer.lr={cfg.optimizer.lr:g}; use fewer warm-up "
            f"steps, e.g. scheduler.warmup_steps={max(1, total_steps // 10)} or scheduler.warmup_fraction=0.1")
    for message in warnings:
        log.warning("%s", message)
    # Not wrong, but worth knowing before a short run: what it will never reach.
    never = [f"trainer.{key}={every} > the run's {total_steps} steps: {what}" for key, every, what in [
        ("eval_every", t.eval_every, "the validation loss is measured once, at the end"),
        ("save_every", t.save_every, "no checkpoint before the end (a crash loses the run; a stop still saves)"),
        ("sample_every", t.sample_every, "no sample is drawn")] if every > total_steps]
    for message in never:
        log.info("%s", message)
    return warnings + never
