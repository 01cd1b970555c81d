"""Many processes as one run, on torch.distributed (gloo on CPUs, NCCL on GPUs).

- ranks.py: who this process is (rank, local rank, world size), from torchrun's or SLURM's variables alone;
- slurm.py: SLURM's facts as torchrun's variables: node lists, tasks per node, a rendezvous port, srun or not;
- world.py: this rank's device, joining the process group;
- collectives.py: the few collectives the loop needs, no-ops with one process;
- strategies.py: single, DDP, FSDP2: how the model is spread over the ranks;
- launch.py: starting a run's processes, one run directory for torchrun and srun ranks, resume commands that
  keep the launcher; workers.py: `trainer.nproc_per_node` workers, watched, restarted, stopped;
- faults.py: a lost rank named once; requeue.py: a preempted submitit job back in the queue;
- agreement.py: every rank started with the same config and data, checked before the first step;
- sharded.py: FSDP2 checkpoints, each rank writing its shards through torch.distributed.checkpoint.
"""
