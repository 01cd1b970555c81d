"""Checkpoints: written atomically, read without unpickling anything.

A checkpoint is a folder: `model.safetensors` (weights), `config.json` (the resolved run config) and
`tokenizer.json`. It is written into a temporary sibling folder, flushed, and renamed into place, so a
crash at any moment leaves either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmtrain.data.tokenizer import TextTokenizer
from lmtrain.errors import CheckpointError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's weights, each shared (tied) tensor once, contiguous, on the CPU."""
    seen: set[int] = set()
    tensors = {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:  # a tied weight: the model re-ties it when built
            continue
        seen.add(t.data_ptr())
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors


def save_checkpoint(path: Path, model: nn.Module, config: dict, tokenizer: TextTokenizer) -> Path:
    """Write a checkpoint folder atomically; an existing one at `path` is replaced."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(model_tensors(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
    (tmp / CONFIG).write_text(json.dumps(config, indent=2))
    tokenizer.save(tmp / TOKENIZER)
    for f in tmp.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    if path.exists():
        os.replace(path, old)  # a folder cannot be renamed over a non-empty one
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def read_config(path: Path) -> dict:
    try:
        return json.loads((Path(path) / CONFIG).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a checkpoint: it has no {CONFIG}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{Path(path) / CONFIG} is corrupt: {e}") from None


def load_weights(path: Path, model: nn.Module) -> None:
    """Load model.safetensors into `model`, naming every missing, unexpected or mis-shaped tensor."""
    file = Path(path) / WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: it has no {WEIGHTS}")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is corrupt or truncated: {e}") from None
    expected = model_tensors(model)
    problems = [f"missing {k} {tuple(v.shape)}" for k, v in expected.items() if k not in tensors]
    problems += [f"unexpected {k} {tuple(v.shape)}" for k, v in tensors.items() if k not in expected]
    problems += [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if problems:
        listing = "; ".join(problems[:20]) + ("; ..." if len(problems) > 20 else "")
        raise CheckpointError(f"{file} does not fit this model ({len(problems)} mismatches): {listing}")
    model.load_state_dict(tensors, strict=False)  # strict=False: tied copies were not saved
