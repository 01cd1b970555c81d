"""Who this process is in a run of several: its rank, local rank, and the run's sizes, from the environment alone
(torchrun's variables, or SLURM's under srun). No torch here, so that commands read it and stay fast."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from lmtrain.distributed.slurm import torchrun_variables


@dataclass(frozen=True)
class World:
    rank: int = 0  # this process's index among all processes
    local_rank: int = 0  # its index on this node: which GPU it drives
    size: int = 1  # processes in the run
    local_size: int = 1  # processes on this node

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes logs, metrics, progress and (unsharded) checkpoints."""
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.size // max(1, self.local_size))

    def rows(self, batch: int) -> slice:
        """This rank's rows of a global batch: disjoint, in rank order, as even as `batch` allows."""
        return slice(self.rank * batch // self.size, (self.rank + 1) * batch // self.size)


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    env = os.environ if env is None else env
    env = {**env, **torchrun_variables(env)}
    size = int(env.get("WORLD_SIZE", "1"))
    return World(rank=int(env.get("RANK", "0")), local_rank=int(env.get("LOCAL_RANK", "0")), size=size,
                 local_size=int(env.get("LOCAL_WORLD_SIZE", str(size))))
