"""A Hugging Face transformers folder as a starting point: its config.json as a ModelConfig, its safetensors
weights renamed into lmtrain's model one tensor at a time, its tokenizer.json as the run's tokenizer.

A folder holds config.json, model.safetensors (or shards that model.safetensors.index.json lists), and
tokenizer.json with tokenizer_config.json. Weights are read only from safetensors: a folder with only
pytorch_model.bin (a pickle) is refused, saying how to convert it. Tensors are read one at a time, each
file opened and closed around it, converted to the model's dtype and copied into a model whose memory
exists once (built on the meta device for generate, eval and export): loading never holds a second
copy of the weights. Every tensor is checked by name and shape from the files' headers before any is read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lmtrain.config import ModelConfig, TokenizerConfig, TokenizerKind
from lmtrain.data.tokenizer import read_tokenizer
from lmtrain.errors import CheckpointError
from lmtrain.hf.architectures import Architecture, hf_names, model_config, transposed
from lmtrain.model import GPT
from lmtrain.model.weights import expected_shapes, model_from_tensors

log = logging.getLogger(__name__)

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "consolidated.00.pth")


def is_hf_folder(path: Path) -> bool:
    """A transformers model folder: its config.json names a model_type (an lmtrain checkpoint's has a `model`
    section instead)."""
    try:
        config = json.loads((Path(path) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config and "model" not in config


@dataclass
class HfFolder:
    """A transformers folder, read from its config.json, tokenizer files and safetensors headers."""

    path: Path
    architecture: Architecture
    model: ModelConfig  # as its config.json describes it
    window: int | None  # its sliding window: a longer model.block_size would compute something else
    tokenizer: TokenizerConfig  # its tokenizer.json, ending documents with its own eos token
    files: dict[str, Path]  # every tensor transformers saved, by its full name, and the safetensors file holding it
    stored: dict[str, str]  # the same tensors' names as stored (some files leave out the base model's prefix)
    shapes: dict[str, tuple[int, ...]]  # and their shapes

    def lmtrain_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """lmtrain's tensors, one at a time, in the dtype the files store: read, transposed, rows stacked."""
        arch = self.architecture
        for name in expected_shapes(self.model):
            parts = [self._read(theirs) for theirs in hf_names(arch, name)]
            parts = [p.t() if transposed(arch, name, p.dim()) else p for p in parts]
            yield name, parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)

    def _read(self, name: str) -> torch.Tensor:
        """One tensor, the file opened just for it: no file stays mapped in memory between tensors."""
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(self.stored[name])

    def build_model(self) -> GPT:
        """The model in float32, its memory allocated once and filled tensor by tensor."""
        return model_from_tensors(self.model, self.lmtrain_tensors(), str(self.path))


def read_folder(path: Path, key: str, weights: bool = True) -> HfFolder:
    """A transformers folder, every file it needs checked before any weight is read (without `weights`, its
    config and tokenizer alone); `key` (e.g. model.init_from=...) starts each error, which names the file and
    what to do."""
    path = Path(path)
    where = f"{key} ({path})"
    try:
        config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot read its {CONFIG}: {e}") from None
    model, arch, window = model_config(config, path.name, where)
    tokenizer = tokenizer_config(path, config, model.vocab_size, where)
    if not weights:
        return HfFolder(path, arch, model, window, tokenizer, {}, {}, {})
    folder = HfFolder(path, arch, model, window, tokenizer, *tensor_index(path, arch, where))
    check_tensors(folder, where)
    return folder


def tensor_index(path: Path, arch: Architecture,
                 where: str) -> tuple[dict[str, Path], dict[str, str], dict[str, tuple[int, ...]]]:
    """Each tensor's file, its name as stored and its shape, from the safetensors headers alone. A stored name
    without the base model's prefix (the hub's gpt2 has `h.0...`, not `transformer.h.0...`) gets it."""
    if (path / INDEX).is_file():
        try:
            index = json.loads((path / INDEX).read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{where}: cannot read its {INDEX}: {e}") from None
        names = sorted(set(index.values()))
    elif (path / SINGLE).is_file():
        names = [SINGLE]
    else:
        pickles = [p for p in PICKLES if (path / p).is_file()] or sorted(p.name for p in path.glob("*.bin"))
        if pickles:
            raise CheckpointError(
                f"{where}: its weights are in {pickles[0]}, a pickle that lmtrain never loads (loading one can run "
                "code); convert it to safetensors where you trust it: python -c \"from transformers import "
                f"AutoModelForCausalLM as M; M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\" "
                f"and use {path}-safetensors")
        raise CheckpointError(f"{where}: it has neither {SINGLE} nor {INDEX}")
    files, stored, shapes = {}, {}, {}
    for name in names:
        file = path / name
        try:
            with safe_open(str(file), framework="pt") as f:
                for tensor in f.keys():
                    full = tensor if tensor.startswith(arch.base) or tensor == "lm_head.weight" else arch.base + tensor
                    files[full], stored[full], shapes[full] = file, tensor, tuple(f.get_slice(tensor).get_shape())
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"{where}: {file} is missing, truncated or not safetensors: {e}") from None
    return files, stored, shapes


def check_tensors(folder: HfFolder, where: str) -> None:
    """Every tensor lmtrain's model needs is there with its shape, and nothing else is (buffers old files kept
    aside; a tied model's lm_head, which some files repeat)."""
    arch, cfg, present = folder.architecture, folder.model, folder.shapes
    problems, used = [], set()
    for name, shape in expected_shapes(cfg).items():
        theirs = hf_names(arch, name)
        missing = [t for t in theirs if t not in present]
        if missing:
            problems.append(f"missing {missing[0]}")
            continue
        used.update(theirs)
        parts = [present[t][::-1] if transposed(arch, name, len(present[t])) else present[t] for t in theirs]
        got = (sum(p[0] for p in parts), *parts[0][1:])
        if got != shape:
            problems.append(f"{', '.join(theirs)}: {got} where the config gives {shape}")
    skipped = {t for t in present if t.endswith(arch.ignored) or (cfg.tie_embeddings and t == "lm_head.weight")}
    problems += [f"unexpected {t}" for t in sorted(set(present) - used - skipped)]
    if problems:
        listing = "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else "")
        raise CheckpointError(f"{where}: its weights do not fit its {CONFIG} ({len(problems)} problems): {listing}")


def tokenizer_config(path: Path, config: dict, vocab_size: int, where: str) -> TokenizerConfig:
    """The run's tokenizer: the folder's tokenizer.json, ending documents with the eos token its
    tokenizer_config.json names (else config.json's eos_token_id)."""
    file = path / TOKENIZER
    if not file.is_file():
        raise CheckpointError(
            f"{where}: it has no {TOKENIZER} (a fast tokenizer), which lmtrain reads; write one where transformers "
            f"is installed: python -c \"from transformers import AutoTokenizer as T; "
            f"T.from_pretrained('{path}').save_pretrained('{path}')\"")
    tokenizer = read_tokenizer(file)
    try:
        declared = json.loads((path / TOKENIZER_CONFIG).read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError, AttributeError):
        declared = None
    eos = declared.get("content") if isinstance(declared, dict) else declared
    if eos is None:
        ids = config.get("eos_token_id")
        ids = ids if isinstance(ids, list) else [ids]
        eos = tokenizer.id_to_token(ids[0]) if ids and ids[0] is not None else None
    if eos is not None and tokenizer.token_to_id(eos) is None:
        raise CheckpointError(f"{where}: its end-of-text token {eos!r} is not in its {TOKENIZER}")
    if tokenizer.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise CheckpointError(f"{where}: its {TOKENIZER} has {tokenizer.get_vocab_size(with_added_tokens=True):,} "
                              f"tokens, more than the model's vocabulary of {vocab_size:,}")
    return TokenizerConfig(kind=TokenizerKind.file, path=str(file), eot_token=eos)
