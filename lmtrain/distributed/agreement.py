"""Every rank started with the same config and trains on the same data: checked once, before the first step.

torchrun and srun start each rank as a whole `lmtrain train`. A node given other overrides (or files of the
same names with other contents) would train on out of step, diverge and exit 0; another trainer.max_steps
ends in a collective of mismatched sizes (on NCCL, maybe a hang). So the ranks compare their resolved
configs as soon as they have joined, before any data is read, and a fingerprint of the data once it is
tokenized. A difference is one line naming the keys and the ranks, said by rank 0; every rank exits 2.
"""

from __future__ import annotations

import torch.distributed as dist

from lmtrain.distributed import collectives
from lmtrain.errors import ConfigError

SHOWN = 5  # differing keys named in the message; the rest are counted


def ranks_text(ranks: list[int]) -> str:
    """`rank 3`, `ranks 0-3`, `ranks 0, 2, 5`."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ", ".join(str(r) for r in ranks)


def differences(everyone: list[dict]) -> list[str]:
    """For each key whose value differs between ranks: `optimizer.lr is 0.002 on rank 0 but 0.001 on rank 1`."""
    found = []
    for key in sorted(set().union(*everyone)):
        by_value: dict[str, list[int]] = {}
        for rank, values in enumerate(everyone):
            by_value.setdefault(repr(values.get(key, "(absent)")), []).append(rank)
        if len(by_value) > 1:
            found.append(f"{key} is " + " but ".join(f"{v} on {ranks_text(r)}" for v, r in by_value.items()))
    return found


def check_same(values: dict[str, object], what: str, fix: str) -> None:
    """Every rank passes its own `values` (a collective); raises ConfigError where any differ, with the message
    on rank 0 only (the others' is empty, so it is printed once)."""
    if not collectives.active():
        return
    everyone = collectives.gather_everywhere(values)
    found = differences(everyone)  # type: ignore[arg-type]
    if not found:
        return
    more = f"; and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
    main = dist.get_rank() == 0
    raise ConfigError(f"the ranks were started with different {what}: {'; '.join(found[:SHOWN])}{more}. {fix}"
                      if main else "")
