"""Checkpoint folders: written atomically, read without unpickling anything.

Every checkpoint folder holds `model.safetensors` (weights), `config.json` (the resolved run config) and
`tokenizer.json`; a training checkpoint adds what resuming needs (lmtrain.train_state). A folder is
written into a temporary sibling, each file flushed to disk, then renamed into place, so a crash at any
moment leaves either the old folder or the new one, never half of one; `recover` tidies what such a
crash leaves behind. Reading goes through safetensors and JSON only, and every failure names the file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lmtrain.data.tokenizer import TextTokenizer
from lmtrain.errors import CheckpointError

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"

# `.NAME.tmp123`: being written; `.NAME.old123`: being replaced; `.NAME.trash123`: being deleted (123: a pid).
_SCRATCH = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|trash)\d+")


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give each file in `folder` the mode the user's umask asks for. safetensors writes 0600 whatever the
    umask, which would hide a run's checkpoints from colleagues on a shared cluster."""
    mode = 0o666 & ~current_umask()
    for f in Path(folder).iterdir():
        if f.is_file():
            os.chmod(f, mode)


def write_folder(path: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling of `path` with `write(tmp)`, flush it, and rename it to `path`, replacing
    any folder there."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        apply_umask(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
    except BaseException:  # a full disk, say: the half-written copy goes, the previous folder stays whole
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    if path.exists():
        os.replace(path, old)  # a folder cannot be renamed over a non-empty one; `recover` undoes a crash here
    os.replace(tmp, path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def remove_folder(path: Path) -> None:
    """Delete a folder; it leaves its name first, so a crash midway never leaves half of it under that name."""
    trash = path.with_name(f".{path.name}.trash{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash)


def write_json(path: Path, obj: Any, allow_nan: bool = False) -> None:
    """Write a JSON file atomically: a reader sees the old content or the new, never a mix. allow_nan: write
    NaN and Infinity as JavaScript does (results of a diverged model), not refuse them."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=allow_nan))


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically: a reader sees the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def recover(folder: Path) -> None:
    """Tidy what a crash during a save left in `folder`: a folder caught between being moved aside and
    its successor arriving is put back; unfinished and half-deleted copies are removed."""
    for p in Path(folder).glob(".*"):
        m = _SCRATCH.fullmatch(p.name)
        if m is None:
            continue
        target = p.with_name(m["name"])
        if m["kind"] == "old" and not target.exists():
            os.replace(p, target)
            log.warning("Restored %s, which an interrupted save had moved aside", target)
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def save_tensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, its I/O failures raised as the OSError they are (full disk, read-only folder)."""
    try:
        save_file(tensors, str(file), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"(?:code: |os error )(\d+)", str(e))
        number = int(code[1]) if code else errno.EIO
        raise OSError(number, os.strerror(number), str(file)) from e


def read_json(file: Path) -> dict:
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is corrupt: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} is corrupt: expected a JSON object")
    return data


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


def nonfinite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity: a diverged model's."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


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


def check_shapes(expected: dict[str, tuple[int, ...]], saved: dict[str, tuple[int, ...]], file: Path) -> None:
    """Refuse a checkpoint file whose tensors differ from a model's, naming every missing, unexpected or
    mis-shaped one."""
    problems = [f"missing {k} {shape}" for k, shape in expected.items() if k not in saved]
    problems += [f"unexpected {k} {shape}" for k, shape in saved.items() if k not in expected]
    problems += [f"{k}: checkpoint {saved[k]} vs model {shape}"
                 for k, shape in expected.items() if k in saved and saved[k] != shape]
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
