"""How the model is spread over the ranks: one process as it is, DDP (a full copy per rank, gradients
averaged), FSDP2 (parameters, gradients and optimizer state sharded over the ranks), or HSDP (FSDP2 within
groups of ranks, a node's GPUs say, the groups replicas of each other: shards gathered over fast links only,
gradients averaged across the groups).

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

from lmtrain.config.train import FsdpDtype, Strategy
from lmtrain.distributed.world import World
from lmtrain.errors import ConfigError


def resolve(strategy: Strategy, world: World) -> Strategy:
    if strategy == Strategy.auto:
        return Strategy.single if world.size == 1 else Strategy.ddp
    if strategy == Strategy.single and world.size > 1:
        raise ConfigError(f"trainer.strategy=single cannot run on {world.size} processes; use trainer.strategy=ddp, "
                          "fsdp, hsdp or auto, or start one process")
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
        return self.strategy in (Strategy.fsdp, Strategy.hsdp)


@dataclass
class Sharding:
    """How FSDP2 and HSDP shard: trainer.reshard_after_forward, fsdp_param_dtype, fsdp_reduce_dtype, hsdp_shard_size."""

    reshard_after_forward: bool = True
    param_dtype: FsdpDtype = FsdpDtype.auto
    reduce_dtype: FsdpDtype = FsdpDtype.auto
    hsdp_shard_size: int = 0


_DTYPES = {FsdpDtype.fp32: torch.float32, FsdpDtype.bf16: torch.bfloat16, FsdpDtype.fp16: torch.float16}


def mixed_precision(sharding: Sharding, bf16: bool, device: torch.device):
    """FSDP2's MixedPrecisionPolicy: auto computes in bf16 on CUDA with trainer.precision bf16 (reducing gradients
    in fp32), and otherwise leaves dtypes alone (on the CPU, autocast already chooses them)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    auto = torch.bfloat16 if bf16 and device.type == "cuda" else None
    param = auto if sharding.param_dtype == FsdpDtype.auto else _DTYPES[FsdpDtype(sharding.param_dtype)]
    reduce = (torch.float32 if param is not None else None) if sharding.reduce_dtype == FsdpDtype.auto \
        else _DTYPES[FsdpDtype(sharding.reduce_dtype)]
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)


def hsdp_mesh(world: World, device: torch.device, shard_size: int):
    """The 2-D device mesh of HSDP: (replicas, ranks per replica), each replica `shard_size` consecutive ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    shard = shard_size or world.local_size
    if shard < 1 or world.size % shard:
        raise ConfigError(f"trainer.hsdp_shard_size={shard_size} must divide the run's {world.size} processes"
                          + (f" (0 takes the {world.local_size} ranks of a node)" if not shard_size else ""))
    return init_device_mesh(device.type, (world.size // shard, shard), mesh_dim_names=("replicate", "shard"))


def wrap(model: nn.Module, strategy: Strategy, device: torch.device, bf16: bool, world: World | None = None,
         sharding: Sharding | None = None) -> Parallel:
    """Wrap `model` for `strategy` (already resolved); build the optimizer after this, over model.parameters().
    Compile the blocks (GPT.compile_blocks) before: FSDP2 then shards the compiled blocks, as torchtitan does."""
    if strategy in (Strategy.fsdp, Strategy.hsdp):
        from torch.distributed.fsdp import fully_shard

        sharding = sharding or Sharding()
        mesh = hsdp_mesh(world or World(), device, sharding.hsdp_shard_size) if strategy == Strategy.hsdp else None
        settings = {"mesh": mesh, "reshard_after_forward": sharding.reshard_after_forward,
                    "mp_policy": mixed_precision(sharding, bf16, device)}
        for block in model.blocks:
            fully_shard(block, **settings)
        fully_shard(model, **settings)  # the root: embeddings, final norm and head
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
