"""Checkpoint folders: written atomically, read without unpickling anything.

Every checkpoint folder holds `model.safetensors` (weights), `config.json` (the resolved run config) and
`tokenizer.json`; a training checkpoint adds what resuming needs (lmtrain.training.state). A folder is
written with lmtrain.files.write_folder, so a crash at any moment leaves either the old folder or the new
one, never half of one. Reading goes through safetensors and JSON only, and every failure names the file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lmtrain.data.tokenizer import TextTokenizer
from lmtrain.errors import CheckpointError
from lmtrain.files import write_folder
from lmtrain.model.weights import fits, model_tensors, nonfinite_names
from lmtrain.runs.records import read_json

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"

def save_tensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, its I/O failures raised as the OSError they are (full disk, read-only folder)."""
    try:
        save_file(tensors, str(file), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"(?:code: |os error )(\d+)", str(e))
        number = int(code[1]) if code else errno.EIO
        raise OSError(number, os.strerror(number), str(file)) from e


def read_tensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata. Anything else (a pickle, a torch.save archive, a
    truncated or damaged file) is refused with the file's name; nothing in it is ever executed."""
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file} is corrupt or truncated, or not a safetensors file: {e}") from None
    return tensors, metadata


def saved_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """A safetensors file's tensor names and shapes, from its header alone."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{file} is corrupt or truncated, or not a safetensors file: {e}") from None


def save_checkpoint(path: Path, model: nn.Module | dict[str, torch.Tensor] | None, config: dict,
                    tokenizer: TextTokenizer, extra: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint folder atomically, replacing one at `path`; `extra(folder)` adds more files.
    `model` may be its weights already gathered, or None when `extra` writes them another way (shards)."""

    tensors = None if model is None else model if isinstance(model, dict) else model_tensors(model)
    nonfinite = nonfinite_names(tensors or {})
    if nonfinite:  # a NaN model is never a checkpoint: best/, final/ and every step folder stay usable
        raise CheckpointError(f"refusing to save {path}: non-finite weights in {', '.join(nonfinite[:5])}")

    def write(folder: Path) -> None:
        if tensors is not None:
            save_tensors(tensors, folder / WEIGHTS, {"format": "pt"})
        (folder / CONFIG).write_text(json.dumps(config, indent=2))
        tokenizer.save(folder / TOKENIZER)
        if extra is not None:
            extra(folder)

    return write_folder(path, write)


def read_config(path: Path) -> dict:
    if not (Path(path) / CONFIG).is_file():
        raise CheckpointError(f"{path} is not a checkpoint: it has no {CONFIG}")
    return read_json(Path(path) / CONFIG)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    file = Path(path) / WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: it has no {WEIGHTS}")
    return read_tensors(file)[0]


def check_shapes(expected: dict[str, tuple[int, ...]], saved: dict[str, tuple[int, ...]], file: Path,
                 vocab_size: int | None = None) -> None:
    """Refuse a checkpoint file whose tensors differ from a model's, naming every missing, unexpected or
    mis-shaped one. With `vocab_size` (weights that start a new run), the shapes need only fit (`fits`)."""
    problems = [f"missing {k} {shape}" for k, shape in expected.items() if k not in saved]
    problems += [f"unexpected {k} {shape}" for k, shape in saved.items() if k not in expected]
    problems += [f"{k}: checkpoint {saved[k]} vs model {shape}" for k, shape in expected.items() if k in saved
                 and saved[k] != shape and not (vocab_size and fits(k, saved[k], shape, vocab_size))]
    if problems:
        listing = "; ".join(problems[:20]) + ("; ..." if len(problems) > 20 else "")
        raise CheckpointError(f"{file} does not fit this model ({len(problems)} mismatches): {listing}")


def apply_weights(tensors: dict[str, torch.Tensor], model: nn.Module, file: Path) -> None:
    """Copy weights into `model`, naming every missing, unexpected or mis-shaped tensor."""
    check_shapes({k: tuple(v.shape) for k, v in model_tensors(model).items()},
                 {k: tuple(v.shape) for k, v in tensors.items()}, file)
    model.load_state_dict(tensors, strict=False)  # strict=False: tied copies were not saved


def load_weights(path: Path, model: nn.Module) -> None:
    """Load a checkpoint folder's model.safetensors into `model`."""
    apply_weights(read_weights(path), model, Path(path) / WEIGHTS)
