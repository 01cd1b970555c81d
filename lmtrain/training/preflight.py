"""Checks before the first step: what needs no data runs before tokenizing, and settings that would waste a
run are named before it starts.

- `model_from_checkpoint` (at the command's start): a `model.init_from` checkpoint's own config gives the
  run's model.* settings; the user's own settings that conflict are refused by name.
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

from lmtrain.config import TokenizerKind, TrainConfig, validate
from lmtrain.config.model import with_checkpoint_shape
from lmtrain.data.tokenizer import TextTokenizer, same_tokenizer
from lmtrain.errors import CheckpointError, DataError
from lmtrain.hf.hub import is_hub_id
from lmtrain.model.weights import expected_shapes
from lmtrain.runs.checkpoint import check_shapes
from lmtrain.runs.trained import load_tokenizer, starting_point
from lmtrain.training.eta import duration
from lmtrain.training.optim import lr_at
from lmtrain.training.state import TrainingCheckpoint

log = logging.getLogger(__name__)

SLOW_STEP_SECONDS = 10.0  # an estimated step longer than this, at the device's peak, gets a warning


def model_from_checkpoint(cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """With `model.init_from`, the run's model.* settings are the checkpoint's own (its config.json), with
    the keys the user set (`explicit`: names of model.* fields) where a run may choose them; other explicit
    values that differ are refused by name. Reads the checkpoint's config alone (for hf:<repo id>, downloads
    its config and tokenizer files, not its weights)."""
    if cfg.model.init_from is None:
        return cfg
    point = starting_point(cfg.model.init_from, "model.init_from", weights=False)
    if point.model is None:  # saved without its config: the configured model must fit its weights
        return cfg
    model = with_checkpoint_shape(cfg.model, point.model, explicit, f"model.init_from={cfg.model.init_from}",
                                  point.hf.window if point.hf is not None else None)
    checked = dataclasses.replace(cfg, model=model)
    validate(checked)
    return checked


def init_from_checked(cfg: TrainConfig, vocab_multiple: int | None = None) -> TrainConfig:
    """The config to train with: with `model.init_from`, the data is tokenized with the checkpoint's own
    tokenizer (a model knows only the ids it was trained with), and its weights must fit the model. Both are
    checked from the checkpoint's files before anything is tokenized; an hf:<repo id> is downloaded here, and
    model.init_from becomes its folder. vocab_multiple: the embedding rows' padding the run will use
    (model.vocab_multiple as the trainer resolves it for its device)."""
    if cfg.model.init_from is None:
        return cfg
    key = f"model.init_from={cfg.model.init_from}"
    point = starting_point(cfg.model.init_from, "model.init_from")
    saved = load_tokenizer(point.tokenizer)
    if cfg.tokenizer.kind == TokenizerKind.file:
        given = TextTokenizer.load(Path(cfg.tokenizer.path).expanduser(), cfg.tokenizer.eot_token)
        if not same_tokenizer(given, saved):
            raise DataError(f"{key}: its model was trained with another tokenizer than tokenizer.path="
                            f"{cfg.tokenizer.path}; use the checkpoint's own: tokenizer.path={point.tokenizer.path}"
                            + (f" tokenizer.eot_token='{saved.eot_token}'" if point.tokenizer.eot_token else ""))
    else:
        log.info("model.init_from: tokenizing the data with the checkpoint's own tokenizer, %s (%s tokens, "
                 "documents end with %s)", point.tokenizer.path, f"{saved.vocab_size:,}", saved.eot_token)
        cfg = dataclasses.replace(cfg, tokenizer=point.tokenizer)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or saved.vocab_size,
                                    vocab_multiple=vocab_multiple or cfg.model.vocab_multiple)
    try:
        check_shapes(expected_shapes(model_cfg), point.shapes(), point.folder, model_cfg.vocab_size)
    except CheckpointError as e:
        raise CheckpointError(f"{key}: {e}") from None
    if is_hub_id(cfg.model.init_from):  # the snapshot folder it was downloaded to: read from here on
        log.info("model.init_from: %s is %s", cfg.model.init_from, point.folder)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=str(point.folder)))
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
