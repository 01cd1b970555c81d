"""Many processes as one run, on torch.distributed (gloo on CPUs, NCCL on GPUs).

- world.py: who this process is (rank, local rank, world size, from torchrun's or SLURM's variables), its
  device, joining the process group;
- collectives.py: the few collectives the loop needs, no-ops with one process;
- strategies.py: single, DDP, FSDP2: how the model is spread over the ranks;
- launch.py: `trainer.nproc_per_node` workers, and one run directory for torchrun and srun ranks;
- sharded.py: FSDP2 checkpoints, each rank writing its shards through torch.distributed.checkpoint.
"""

from lmtrain.distributed.world import World, pick_device, world_from_env

__all__ = ["World", "pick_device", "world_from_env"]
