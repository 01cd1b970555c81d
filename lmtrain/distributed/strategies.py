"""How the model is spread over the ranks: one process as it is, DDP (a full copy per rank, gradients
averaged), or FSDP2 (parameters, gradients and optimizer state sharded over the ranks).

`wrap` returns a `Parallel`: the forward to call, the context that skips DDP's gradient all-reduce on
every micro-batch but the last, and helpers that hide the difference between plain tensors and FSDP2's
DTensors. The model object itself stays the one `GPT` built (FSDP2 shards it in place); it is what
checkpoints save.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from inspect import signature

import torch
from torch import nn

from lmtrain.config.train import Strategy
from lmtrain.distributed.world import World
from lmtrain.errors import ConfigError


def resolve(strategy: Strategy, world: World) -> Strategy:
    if strategy == Strategy.auto:
        return Strategy.single if world.size == 1 else Strategy.ddp
    if strategy == Strategy.single and world.size > 1:
        raise ConfigError(f"trainer.strategy=single cannot run on {world.size} processes; use trainer.strategy=ddp, "
                          "fsdp or auto, or start one process")
    return strategy


@dataclass
class Parallel:
    strategy: Strategy
    forward: Callable  # (input, target) -> loss: the model itself or its DDP wrapper
    ddp: nn.Module | None = None  # the DDP wrapper, for no_sync

    def sync_gradients(self, last: bool):
        """A context for one micro-batch's backward: DDP all-reduces gradients only on the last one."""
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    @property
    def sharded(self) -> bool:
        return self.strategy == Strategy.fsdp


def wrap(model: nn.Module, strategy: Strategy, device: torch.device, bf16: bool) -> Parallel:
    """Wrap `model` for `strategy` (already resolved); build the optimizer after this, over model.parameters().
    Compile the blocks (GPT.compile_blocks) before: FSDP2 then shards the compiled blocks, as torchtitan does."""
    if strategy == Strategy.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 compute with fp32 gradient reduction on CUDA; on the CPU, autocast already chooses the dtype
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if bf16 and device.type == "cuda" else MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # the root: embeddings, final norm and head
        return Parallel(strategy, model)
    if strategy == Strategy.ddp:
        from torch.nn.parallel import DistributedDataParallel

        # no buffer sync in forward: the model's buffers are constants (RoPE tables), and a broadcast in every
        # forward would make ranks that run different numbers of forwards (sampling on rank 0) wait on each other
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in signature(DistributedDataParallel).parameters \
            else "broadcast_buffers"  # the older name, deprecated in torch 2.13
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      **{no_sync: False})
        return Parallel(strategy, ddp, ddp)
    return Parallel(strategy, model)


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP2's parameters, gradient norms); any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
