"""What a run needs to continue exactly where it stopped, and the folders under RUN/checkpoints that hold it.

    checkpoints/
      step_000500/   model.safetensors, optimizer.safetensors, rng_state.safetensors, trainer_state.json,
                     config.json, tokenizer.json: all that resuming needs
      latest.json    {"step": 500, "folder": "step_000500"}, rewritten once the step folder is in place
      best/          the weights with the lowest validation loss so far, and eval.json (its step and loss)
      final/         the weights at the end of the run

A step folder counts once latest.json names it: one newer than the pointer (a crash struck between the
two) is ignored, and replaced when training reaches that step again. Resuming reads a whole checkpoint
before changing anything, and `trainer.resume=auto` falls back to the previous step folder when the
newest cannot be read. Optimizer and RNG states are tensors in safetensors files with their structure
as JSON metadata; the loop's counters, the loader position and the length of metrics.jsonl are JSON.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmtrain.config import TokenizerConfig
from lmtrain.config.base import flatten
from lmtrain.data.loader import TrainLoader
from lmtrain.data.tokenizer import TextTokenizer, same_tokenizer
from lmtrain.distributed import collectives
from lmtrain.distributed.sharded import (
    check_shards,
    full_weights,
    is_sharded,
    load_full_weights,
    load_shards,
    save_shards,
)
from lmtrain.distributed.world import World
from lmtrain.errors import CheckpointError, ConfigError, DataError
from lmtrain.files import recover, remove_folder, write_json
from lmtrain.model.weights import copy_weights, expected_shapes, fitted
from lmtrain.runs.checkpoint import (
    WEIGHTS,
    apply_weights,
    check_shapes,
    read_config,
    read_tensors,
    read_weights,
    save_checkpoint,
    save_tensors,
)
from lmtrain.runs.metrics import rewind
from lmtrain.runs.records import LATEST, TRAINER_STATE, read_trainer_state, step_candidates, step_folders
from lmtrain.runs.trained import load_tokenizer, starting_point, tokenizer_config

log = logging.getLogger(__name__)

OPTIMIZER = "optimizer.safetensors"
RNG = "rng_state.safetensors"  # rank 0's; rank r > 0 of a distributed run saves rng_state.rank<r>.safetensors
BEST_INFO = "eval.json"

Tensors = tuple[dict[str, torch.Tensor], dict[str, str]]  # a safetensors file: tensors and string metadata


def optimizer_state(optimizer: torch.optim.Optimizer) -> Tensors:
    """The optimizer's state_dict as tensors named `state.<param index>.<key>`, the rest as JSON metadata."""
    sd = optimizer.state_dict()
    tensors, other = {}, {}
    for index, values in sd["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                other.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": json.dumps(sd["param_groups"]), "other_state": json.dumps(other)}


def load_optimizer_state(saved: Tensors, optimizer: torch.optim.Optimizer, file: Path) -> None:
    """Put saved per-parameter state into an optimizer built from the current config; its hyperparameters
    (lr, betas, weight decay) stay the config's."""
    tensors, metadata = saved
    try:
        saved_groups, other = json.loads(metadata["param_groups"]), json.loads(metadata["other_state"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is corrupt: its optimizer structure is unreadable ({e})") from None
    groups = optimizer.state_dict()["param_groups"]
    saved_sizes, sizes = [len(g["params"]) for g in saved_groups], [len(g["params"]) for g in groups]
    if saved_sizes != sizes:
        raise CheckpointError(f"{file} does not fit this optimizer: parameter groups of sizes {saved_sizes} "
                              f"in the checkpoint vs {sizes} here")
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in other.items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> Tensors:
    """Python, NumPy, torch CPU and (when in use) CUDA random states."""
    version, words, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    tensors = {"torch_cpu": torch.get_rng_state(), "python": torch.tensor(words, dtype=torch.int64),
               "numpy": torch.from_numpy(np_state["state"]["key"].astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    scalars = {"python_version": version, "python_gauss": gauss, "numpy_pos": int(np_state["state"]["pos"]),
               "numpy_has_gauss": int(np_state["has_gauss"]), "numpy_gauss": float(np_state["gauss"])}
    return tensors, {"scalars": json.dumps(scalars)}


def set_rng_state(saved: Tensors, file: Path) -> None:
    tensors, metadata = saved
    try:
        s = json.loads(metadata["scalars"])
        random.setstate((s["python_version"], tuple(tensors["python"].tolist()), s["python_gauss"]))
        np.random.set_state({"bit_generator": "MT19937", "has_gauss": s["numpy_has_gauss"], "gauss": s["numpy_gauss"],
                             "state": {"key": tensors["numpy"].numpy().astype(np.uint32), "pos": s["numpy_pos"]}})
        torch.set_rng_state(tensors["torch_cpu"])
    except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is corrupt: {type(e).__name__}: {e}") from None
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        for i in range(min(len(cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda[i], i)


def rng_file(folder: Path, rank: int) -> Path:
    """This rank's RNG state in a checkpoint; rank 0's when the run that saved it had fewer ranks."""
    own = Path(folder) / f"rng_state.rank{rank}.safetensors"
    return own if rank > 0 and own.exists() else Path(folder) / RNG


@dataclass
class TrainingCheckpoint:
    """A step folder, read whole and checked for readability; nothing is applied until `apply`."""

    folder: Path
    state: dict  # trainer_state.json: the loop's counters, the loader position, the metrics.jsonl length
    config: dict
    weights: dict[str, torch.Tensor] | None  # None: a sharded checkpoint, loaded by `apply`
    optimizer: Tensors | None
    rng: Tensors

    @staticmethod
    def state_of(folder: Path) -> dict:
        """A step folder's trainer_state.json, once the folder is known to be one; no tensor is read."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is missing")
        if not (folder / TRAINER_STATE).exists() and (folder / WEIGHTS).exists():
            raise CheckpointError(f"{folder} holds weights only, no training state to resume; to start from "
                                  f"these weights with a fresh optimizer, use model.init_from={folder}")
        return read_trainer_state(folder)

    @classmethod
    def read(cls, folder: Path, rank: int = 0) -> TrainingCheckpoint:
        folder = Path(folder)
        state = cls.state_of(folder)
        rng = read_tensors(rng_file(folder, rank))
        if is_sharded(folder):
            check_shards(folder, state.get("shards"))
            return cls(folder, state, read_config(folder), None, None, rng)
        return cls(folder, state, read_config(folder), read_weights(folder), read_tensors(folder / OPTIMIZER), rng)

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: TrainLoader, sharded: bool,
              rank: int = 0) -> None:
        if self.weights is None:
            load_shards(self.folder, model, optimizer)
        elif sharded:
            raise CheckpointError(f"{self.folder} holds a whole (unsharded) training state, which trainer.strategy="
                                  "fsdp does not resume; resume it with trainer.strategy=ddp, or start from its "
                                  f"weights with model.init_from={self.folder}")
        else:
            apply_weights(self.weights, model, self.folder / WEIGHTS)
            load_optimizer_state(self.optimizer, optimizer, self.folder / OPTIMIZER)
        loader.load_state_dict(self.state["loader"])
        set_rng_state(self.rng, rng_file(self.folder, rank))


class Checkpointer:
    """Saves a run's checkpoints under RUN/checkpoints, and restores the one `trainer.resume` names."""

    def __init__(self, run_dir: Path, keep_last: int, config: dict, tokenizer: TextTokenizer,
                 world: World | None = None, sharded: bool = False):
        self.root, self.metrics_file = Path(run_dir) / "checkpoints", Path(run_dir) / "metrics.jsonl"
        self.keep_last, self.config, self.tokenizer = keep_last, config, tokenizer
        self.world, self.sharded = world or World(), sharded  # sharded: FSDP2, every rank writes its own shards
        t = config.get("trainer", {})
        # sequences per optimizer step, every rank's together: a resume at another global batch is refused
        self.global_batch = t["batch_size"] * t["grad_accum_steps"] * self.world.size if t else None
        if self.root.is_dir() and self.world.main:
            recover(self.root)

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: TrainLoader, state: dict) -> Path:
        """A step checkpoint of the whole training state; `state` holds the loop's counters, `step` among them.

        Every rank of a distributed run calls it: rank 0 writes the folder (with every rank's RNG state); under
        FSDP2 each rank adds its shards into it before it is renamed into place."""
        step, start = state["step"], time.perf_counter()
        size = self.metrics_file.stat().st_size if self.metrics_file.exists() else 0  # every record is flushed
        state = {**state, "loader": loader.state_dict(), "metrics_bytes": size, "world_size": self.world.size,
                 "global_batch": self.global_batch}
        rngs = collectives.gather_to_main(rng_state())
        path = self.root / f"step_{step:06d}"

        def extra(folder: Path) -> None:
            if self.sharded:
                state["shards"] = save_shards(collectives.from_main(folder), model, optimizer)
            else:
                opt_tensors, opt_meta = optimizer_state(optimizer)
                save_tensors(opt_tensors, folder / OPTIMIZER, {"format": "pt", **opt_meta})
            for rank, (rng_tensors, rng_meta) in enumerate(rngs):
                name = RNG if rank == 0 else f"rng_state.rank{rank}.safetensors"
                save_tensors(rng_tensors, folder / name, {"format": "pt", **rng_meta})
            (folder / TRAINER_STATE).write_text(json.dumps(state, indent=2))

        if not self.world.main:
            if self.sharded:
                save_shards(collectives.from_main(None), model, optimizer)
            collectives.barrier()  # the folder is in place
            return path
        folder = save_checkpoint(path, None if self.sharded else model, self.config, self.tokenizer, extra)
        write_json(self.root / LATEST, {"step": step, "folder": folder.name})
        if self.keep_last > 0:
            done = [f for s, f in step_folders(self.root) if s <= step]  # newest first
            for old in done[self.keep_last:]:
                remove_folder(old)
        collectives.barrier()
        log.info("Saved checkpoint %s in %.2f s", folder, time.perf_counter() - start)
        return folder

    def save_best(self, model: nn.Module, step: int, val_loss: float) -> Path:
        info = json.dumps({"step": step, "val_loss": val_loss})
        return self._save_weights(self.root / "best", model, lambda folder: (folder / BEST_INFO).write_text(info))

    def save_final(self, model: nn.Module) -> Path:
        return self._save_weights(self.root / "final", model)

    def _save_weights(self, path: Path, model: nn.Module, extra=None) -> Path:
        """A weights-only folder, written by rank 0 (FSDP2: from weights gathered from every rank)."""
        weights = full_weights(model, self.sharded) if self.sharded or self.world.main else {}
        if self.world.main:
            save_checkpoint(path, weights, self.config, self.tokenizer, extra)
        return path

    def start(self, resume: str | None, init_from: str | None, model: nn.Module, optimizer: torch.optim.Optimizer,
              loader: TrainLoader) -> dict | None:
        """Restore the training state `trainer.resume` names and return the loop's counters; or, with none to
        restore, load `model.init_from`'s weights (if set) and return None: the run starts at step 0."""

        def restore(checkpoint: TrainingCheckpoint) -> None:
            self._check_global_batch(checkpoint)
            self._warn_about_changes(checkpoint.config)
            self._check_tokenizer(tokenizer_config(checkpoint.folder, checkpoint.config), f"trainer.resume={resume}")
            checkpoint.apply(model, optimizer, loader, self.sharded, self.world.rank)

        if resume == "auto":
            checkpoint = self._newest_restored(restore)
        elif resume is not None:
            try:
                checkpoint = TrainingCheckpoint.read(Path(resume).expanduser(), self.world.rank)
                restore(checkpoint)
            except CheckpointError as e:
                raise CheckpointError(f"trainer.resume={resume}: {e}") from None
        else:
            checkpoint = None
        if checkpoint is None:
            if init_from is not None:
                self._start_from(init_from, model)
            return None
        step = checkpoint.state["step"]
        if checkpoint.folder.resolve().parent == self.root.resolve():  # this run's own
            self.rewind_metrics(checkpoint.state)
        if init_from is not None:
            log.info("model.init_from is not used: the weights come from the checkpoint being resumed")
        log.info("Resuming from %s at step %d", checkpoint.folder, step)
        return checkpoint.state

    def _check_global_batch(self, checkpoint: TrainingCheckpoint) -> None:
        """Refuse to resume at another global batch than the checkpoint trained with (another world size, say):
        the loader's position, the tokens counted and the loss all assume it. trainer.allow_batch_change allows."""
        state, block = checkpoint.state, checkpoint.config.get("model", {}).get("block_size")
        saved = state.get("global_batch") or (state["tokens"] // state["step"] // block  # saved before it was kept
                                              if state.get("tokens") and state["step"] and block else None)
        if saved is None or self.global_batch is None or saved == self.global_batch:
            return
        t, n = self.config["trainer"], self.world.size
        now = (f"{self.global_batch} (trainer.batch_size={t['batch_size']} x trainer.grad_accum_steps="
               f"{t['grad_accum_steps']} x {n} process{'es' if n > 1 else ''})")
        ranks = f" on {state['world_size']} processes" if state.get("world_size") else ""
        if t.get("allow_batch_change"):
            log.warning("trainer.allow_batch_change=true: resuming %s, trained with a global batch of %d sequences "
                        "per step%s, at %s", checkpoint.folder, saved, ranks, now)
            return
        raise ConfigError(f"{checkpoint.folder} was trained with a global batch of {saved} sequences per step{ranks}; "
                          f"this run's is {now}. Resume with the same launcher and process count (the command "
                          f"printed when the run stopped keeps them), or a batch that makes {saved}; "
                          "trainer.allow_batch_change=true resumes anyway" if self.world.main else "")  # said once

    def _start_from(self, init_from: str, model: nn.Module) -> None:
        """Load `model.init_from`'s weights (an lmtrain checkpoint's or a transformers folder's), tensor by tensor
        into the model, or, sharded, as whole tensors each rank keeps its shards of."""
        key = f"model.init_from={init_from}"
        point = starting_point(init_from, "model.init_from")
        self._check_tokenizer(point.tokenizer, key)
        shapes, vocab = expected_shapes(model.cfg), model.cfg.vocab_size
        try:
            check_shapes(shapes, point.shapes(), point.folder, vocab)  # all names and shapes before any copy
            if self.sharded:
                load_full_weights(model, {name: fitted(name, t, shapes[name], vocab) for name, t in point.tensors()})
            else:
                copy_weights(model, point.tensors(), str(point.folder))
        except CheckpointError as e:
            raise CheckpointError(f"{key}: {e}") from None
        log.info("Initialized the weights from %s (model.init_from); the optimizer starts fresh", init_from)

    def _check_tokenizer(self, saved: TokenizerConfig, key: str) -> None:
        """The checkpoint's model must have learned the ids of the tokenizer that made this run's token cache."""
        if not same_tokenizer(load_tokenizer(saved), self.tokenizer):
            raise DataError(f"{key}: its model was trained with another tokenizer than the one this run's data was "
                            f"tokenized with ({self.tokenizer.vocab_size:,} tokens); tokenize with the checkpoint's "
                            f"own: tokenizer=file tokenizer.path={saved.path}")

    def _newest_restored(self, restore: Callable[[TrainingCheckpoint], None]) -> TrainingCheckpoint | None:
        """trainer.resume=auto: the newest step folder that reads whole and restores (`restore` applies it); a
        damaged one (a truncated or missing shard file of a sharded checkpoint too) falls back to the one before."""
        candidates = step_candidates(self.root)
        if not candidates:
            log.info("trainer.resume=auto: no checkpoint in %s yet; starting fresh", self.root)
            if self.world.main:
                self._rewind_metrics(0, "by an earlier attempt that saved no checkpoint")
            return None
        problems = []
        for folder in candidates:
            try:
                checkpoint = TrainingCheckpoint.read(folder, self.world.rank)
                restore(checkpoint)
            except CheckpointError as e:
                log.warning("Cannot resume from %s: %s", folder.name, e)
                problems.append(str(e))
                continue
            if problems:
                log.warning("Falling back to %s, the newest checkpoint that reads whole", folder.name)
            return checkpoint
        raise CheckpointError(f"trainer.resume=auto: no checkpoint in {self.root} can be read: " + "; ".join(problems))

    def rewind_metrics(self, state: dict) -> None:
        """Cut metrics.jsonl back to where it was when the checkpoint with this training state was saved."""
        if self.world.main:
            self._rewind_metrics(state["metrics_bytes"], f"after step {state['step']}")

    def _rewind_metrics(self, size: int, when: str) -> None:
        """Drop metrics.jsonl records that the checkpoint does not account for, so the file reads as one run."""
        if self.metrics_file.exists() and self.metrics_file.stat().st_size < size:
            log.warning("%s is shorter than when the checkpoint was saved; appending to it as it is", self.metrics_file)
        dropped = rewind(self.metrics_file, size)
        if dropped:
            log.info("Dropped %d records from %s, logged %s", dropped, self.metrics_file.name, when)

    def _warn_about_changes(self, saved: dict) -> None:
        old, new = flatten(saved), flatten(self.config)
        changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
                   if old.get(k) != new.get(k) and k != "trainer.resume"]
        if changed:
            log.warning("Resuming with settings that differ from the checkpoint's: %s", "; ".join(changed))
