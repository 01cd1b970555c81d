"""Checkpoints of a run sharded with FSDP2: every rank writes its own shards, with torch.distributed.checkpoint.

A sharded step folder holds, beside today's JSON files and RNG states, `shards/`: one safetensors file
per rank (DCP's Hugging Face storage format, whose offsets live in the files' JSON metadata, so nothing
is ever unpickled) with the model's and the optimizer's tensors, named `model.<param>` and
`optimizer.<param>.<state>`. DCP reshards on load: a checkpoint saved by N ranks loads on M ranks, or
into an unsharded model on one process. `final/` and `best/` get a consolidated `model.safetensors`, so
generate, eval, export and init_from read them as any other checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lmtrain.errors import CheckpointError
from lmtrain.model.weights import model_tensors

SHARDS = "shards"

# torch.distributed.checkpoint is imported where a sharded model needs it: it takes half a second to import
# (DTensor, sympy), which every other run and every command would pay at start-up.


def is_sharded(folder: Path) -> bool:
    return (Path(folder) / SHARDS).is_dir()


def _tied_names(model: nn.Module) -> set[str]:
    """Names under which a parameter appears a second time (the head tied to the embedding)."""
    first = {name for name, _ in model.named_parameters()}
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - first


def full_weights(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU, each tied tensor once, on rank 0 (FSDP2: gathered from every
    rank, which must all call this; the other ranks get an empty dict)."""
    if not sharded:
        return model_tensors(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tied = _tied_names(model)
    return {k: v.contiguous() for k, v in full.items() if k not in tied}


def _optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside `optimizer`: the parts of a combined one (optimizer=muon: Muon beside AdamW,
    lmtrain.training.optim.CombinedOptimizer), which DCP takes as a list, or the optimizer itself."""
    return list(getattr(optimizer, "optimizers", [optimizer]))


def _flat(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """The model's and optimizer's state dicts (sharded as the model is) and one flat view of their tensors. The
    optimizer's state is keyed by parameter name, so a combined optimizer's parts sit side by side in it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_sd = get_model_state_dict(model)
    optim_sd = get_optimizer_state_dict(model, _optimizers(optimizer))
    tied = _tied_names(model)  # safetensors stores a shared tensor once: under its first name
    flat = {f"model.{k}": v for k, v in model_sd.items() if k not in tied}
    for param, values in optim_sd["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                flat[f"optimizer.{param}.{key}"] = value
    return flat, model_sd, optim_sd


def save_shards(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Every rank writes its shards of the model and optimizer state into folder/shards (a collective); returns
    the files written, which a resume checks are all there and whole."""
    import torch.distributed.checkpoint as dcp

    flat, _, _ = _flat(model, optimizer)
    dcp.save(flat, storage_writer=dcp.HuggingFaceStorageWriter(str(Path(folder) / SHARDS), save_distributed=True))
    return sorted(p.name for p in (Path(folder) / SHARDS).glob("*.safetensors"))


def check_shards(folder: Path, saved: list[str] | None) -> None:
    """Refuse a sharded checkpoint whose shard files are missing (`saved`: the names it was saved with, when
    recorded) or truncated, before any rank loads from it: every rank reads the same files, so all agree."""
    shards = Path(folder) / SHARDS
    present = sorted(p.name for p in shards.glob("*.safetensors"))
    missing = sorted(set(saved or []) - set(present))
    if missing or not present:
        raise CheckpointError(f"{shards} is missing shard files: {', '.join(missing) or 'all of them'}")
    for name in present:
        try:
            with safe_open(str(shards / name), framework="pt"):  # reads the header, checks the file's length
                pass
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{shards / name} is truncated or corrupt: {e}") from None


def load_shards(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint into the model and optimizer, whatever the number of ranks that saved it
    and however the model is now spread (a collective when distributed). Hyperparameters stay the config's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    flat, model_sd, optim_sd = _flat(model, optimizer)
    try:
        dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(str(Path(folder) / SHARDS)))
    except (Exception, dcp.CheckpointException) as e:  # DCP's CheckpointException (every rank's failures) is a
        # BaseException, which `except Exception` would let through as a traceback
        raise CheckpointError(f"{Path(folder) / SHARDS} cannot be loaded into this model: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    model_sd = {k: flat[f"model.{k}"] for k in model_sd if f"model.{k}" in flat}  # tied copies follow their own
    for param, values in optim_sd["state"].items():
        for key in values:
            if f"optimizer.{param}.{key}" in flat:
                values[key] = flat[f"optimizer.{param}.{key}"]
    set_model_state_dict(model, model_sd, options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, _optimizers(optimizer), optim_sd)


def load_full_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Whole weights (a model.safetensors, read by every rank) into a sharded model: each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    expected = {k for k in get_model_state_dict(model)} - _tied_names(model)
    if set(tensors) != expected:
        raise CheckpointError(f"its weights do not fit this model: missing {sorted(expected - set(tensors))[:5]}, "
                              f"unexpected {sorted(set(tensors) - expected)[:5]}")
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
