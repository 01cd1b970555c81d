"""A trained model ready for use (generate, eval, export, init_from): which checkpoint a path means, and loading it.

A path names an lmtrain checkpoint folder, a run directory (its best, latest or final checkpoint), a Hugging
Face transformers folder, or `hf:<repo id>` on the hub (lmtrain.hf reads the last two).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lmtrain.config import ModelConfig, TokenizerConfig, TokenizerKind, as_plain_dict, to_config
from lmtrain.data.tokenizer import TextTokenizer
from lmtrain.errors import CheckpointError, ConfigError
from lmtrain.hf.hub import hub_folder, hub_repo, is_hub_id
from lmtrain.hf.load import HfFolder, is_hf_folder, read_folder
from lmtrain.model.weights import expected_shapes, model_from_tensors, nonfinite_names
from lmtrain.runs.checkpoint import CONFIG, TOKENIZER, WEIGHTS, check_shapes, read_config, saved_shapes
from lmtrain.runs.records import step_candidates


def is_checkpoint(path: Path) -> bool:
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder `path` names: itself, or for a run directory (or its checkpoints/ folder) the run's
    best checkpoint, else its latest step checkpoint (the one latest.json names, else the newest), else final;
    a transformers folder as it is; `hf:<repo id>` downloaded into the hub's cache."""
    if is_hub_id(str(path)):
        return hub_folder(str(path), "checkpoint")
    given = Path(path).expanduser()
    if is_checkpoint(given) or is_hf_folder(given):
        return given
    if not given.is_dir():
        raise CheckpointError(f"checkpoint={path}: no such directory")
    root = given / "checkpoints" if (given / "checkpoints").is_dir() else given
    latest = next((folder for folder in step_candidates(root) if is_checkpoint(folder)), None)
    for candidate in [root / "best", latest, root / "final"]:
        if candidate is not None and is_checkpoint(candidate):
            return candidate
    raise CheckpointError(f"checkpoint={path} is neither a checkpoint (a folder with {CONFIG} and {WEIGHTS}), a run "
                          "directory with checkpoints/best, a step checkpoint or checkpoints/final, nor a Hugging Face "
                          "transformers folder")


def tokenizer_config(folder: Path, config: dict) -> TokenizerConfig:
    """The tokenizer a checkpoint's model was trained with, as a config: its tokenizer.json and end-of-text token."""
    eot = (config.get("tokenizer") or {}).get("eot_token")
    return TokenizerConfig(kind=TokenizerKind.file, path=str(Path(folder) / TOKENIZER), eot_token=eot)


def load_tokenizer(cfg: TokenizerConfig) -> TextTokenizer:
    return TextTokenizer.load(Path(cfg.path), cfg.eot_token)


@dataclass
class StartingPoint:
    """What `model.init_from` names, read from its files before any weight: the model its config describes,
    its tokenizer, and how its weights come, in lmtrain's names, one tensor at a time."""

    folder: Path
    model: ModelConfig | None  # None: an lmtrain checkpoint saved without its config (the run's model.* must fit)
    tokenizer: TokenizerConfig
    hf: HfFolder | None = None  # a transformers folder; None: an lmtrain checkpoint

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Its weights' names and shapes, as lmtrain's model names them, from the files' headers alone."""
        if self.hf is not None:
            return expected_shapes(self.hf.model)  # read_folder checked the files against these
        return saved_shapes(self.folder / WEIGHTS)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in lmtrain's names, read one at a time from the memory-mapped files."""
        if self.hf is not None:
            yield from self.hf.lmtrain_tensors()
            return
        with safe_open(str(self.folder / WEIGHTS), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def starting_point(ref: str, key: str, weights: bool = True) -> StartingPoint:
    """Read what `ref` names (`key`, e.g. model.init_from, starts each error): an lmtrain checkpoint folder, a
    transformers folder, or hf:<repo id>, downloaded (without `weights`: its config and tokenizer alone)."""
    folder = hub_folder(ref, key, weights) if is_hub_id(ref) else Path(ref).expanduser()
    if is_hf_folder(folder):
        hf = read_folder(folder, f"{key}={ref}", weights)
        if is_hub_id(ref):
            hf.model.name = hub_repo(ref)
        return StartingPoint(folder, hf.model, hf.tokenizer, hf)
    for name in (TOKENIZER, WEIGHTS, CONFIG):
        if not (folder / name).is_file():
            raise CheckpointError(f"{key}={ref} is neither an lmtrain checkpoint nor a Hugging Face transformers "
                                  f"folder: it has no {name}")
    config = read_config(folder)
    model = None
    if config.get("model"):
        try:
            model = to_config(config["model"], ModelConfig)
        except (TypeError, ConfigError) as e:
            raise CheckpointError(f"{key}={ref}: {folder / CONFIG} has no usable model settings: {e}") from None
    return StartingPoint(folder, model, tokenizer_config(folder, config))


@dataclass
class TrainedModel:
    path: Path  # the checkpoint folder
    model: nn.Module  # a GPT, in eval mode, on the device asked for
    tokenizer: TextTokenizer
    tokenizer_config: TokenizerConfig  # the same tokenizer as a config: for tokenizing data as it was trained
    config: dict  # the run's resolved config, as saved (a transformers folder: its model and tokenizer)


def load_trained(path: str | Path, device: torch.device) -> TrainedModel:
    """The model and tokenizer of a checkpoint, or of a run directory's best/latest/final checkpoint, or of a
    transformers folder (built on the meta device and filled tensor by tensor: one copy of the weights)."""
    folder = resolve_checkpoint(path)
    if is_hf_folder(folder):
        hf = read_folder(folder, f"checkpoint={path}")
        model, tok_cfg = hf.build_model(), hf.tokenizer
        config = {"model": as_plain_dict(hf.model), "tokenizer": as_plain_dict(tok_cfg)}
    else:
        config = read_config(folder)
        try:
            model_cfg = to_config(config["model"], ModelConfig)
        except (KeyError, TypeError, ConfigError) as e:
            raise CheckpointError(f"{folder / CONFIG} has no usable model settings: {e}") from None
        point = StartingPoint(folder, model_cfg, tokenizer_config(folder, config))
        check_shapes(expected_shapes(model_cfg), point.shapes(), folder / WEIGHTS)
        model, tok_cfg = model_from_tensors(model_cfg, point.tensors(), str(folder / WEIGHTS)), point.tokenizer
    nonfinite = [] if is_hf_folder(folder) else nonfinite_names(dict(model.named_parameters()))
    if nonfinite:  # written before lmtrain refused to save such weights: a diverged run
        raise CheckpointError(f"{folder / WEIGHTS} holds non-finite weights ({', '.join(nonfinite[:3])}): the run had "
                              "diverged when it was saved; use an earlier checkpoint")
    tokenizer = load_tokenizer(tok_cfg)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise CheckpointError(f"{folder}: its tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                              f"vocabulary of {model.cfg.vocab_size}")
    return TrainedModel(folder, model.to(device).eval(), tokenizer, tok_cfg, config)
