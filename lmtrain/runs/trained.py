"""A trained model ready for use (generate, eval, export): which checkpoint a path means, and loading it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmtrain.config import ModelConfig, to_config
from lmtrain.data.tokenizer import TextTokenizer
from lmtrain.errors import CheckpointError, ConfigError
from lmtrain.model import GPT
from lmtrain.model.weights import nonfinite_names
from lmtrain.runs.checkpoint import CONFIG, TOKENIZER, WEIGHTS, load_weights, read_config
from lmtrain.runs.records import step_candidates


def is_checkpoint(path: Path) -> bool:
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder `path` names: itself, or for a run directory (or its checkpoints/ folder) the run's
    best checkpoint, else its latest step checkpoint (the one latest.json names, else the newest), else final."""
    given = Path(path).expanduser()
    if is_checkpoint(given):
        return given
    if not given.is_dir():
        raise CheckpointError(f"checkpoint={path}: no such directory")
    root = given / "checkpoints" if (given / "checkpoints").is_dir() else given
    latest = next((folder for folder in step_candidates(root) if is_checkpoint(folder)), None)
    for candidate in [root / "best", latest, root / "final"]:
        if candidate is not None and is_checkpoint(candidate):
            return candidate
    raise CheckpointError(f"checkpoint={path} is neither a checkpoint (a folder with {CONFIG} and {WEIGHTS}) nor a "
                          "run directory with checkpoints/best, a step checkpoint or checkpoints/final")


@dataclass
class TrainedModel:
    path: Path  # the checkpoint folder
    model: GPT  # in eval mode, on the device asked for
    tokenizer: TextTokenizer
    config: dict  # the run's resolved config, as saved


def load_trained(path: str | Path, device: torch.device) -> TrainedModel:
    """The model and tokenizer of a checkpoint, or of a run directory's best/latest/final checkpoint."""
    folder = resolve_checkpoint(path)
    config = read_config(folder)
    try:
        model_cfg = to_config(config["model"], ModelConfig)
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{folder / CONFIG} has no usable model settings: {e}") from None
    model = GPT(model_cfg)
    load_weights(folder, model)
    nonfinite = nonfinite_names(dict(model.named_parameters()))
    if nonfinite:  # written before lmtrain refused to save such weights: a diverged run
        raise CheckpointError(f"{folder / WEIGHTS} holds non-finite weights ({', '.join(nonfinite[:3])}): the run had "
                              "diverged when it was saved; use an earlier checkpoint")
    tokenizer = TextTokenizer.load(folder / TOKENIZER)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise CheckpointError(f"{folder}: its tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                              f"vocabulary of {model_cfg.vocab_size}")
    return TrainedModel(folder, model.to(device).eval(), tokenizer, config)
