"""When a distributed run loses a rank: which one, said once.

A rank that dies, or stops answering (a hung GPU, a deadlock, a stopped process), makes the others' next
collective fail: at once when its connections close, after trainer.dist_timeout_s when it hangs. The ranks
still alive then answer a roll call in the rendezvous store (torchrun's agent's, or rank 0's): each writes
its rank, and those missing after a grace period are the lost ones. The lowest rank that answered names
them, with the timeout when it was one; every survivor raises LostRank (exit 4), the others with an empty
message, so the console shows the diagnosis once and a launcher does not blame a healthy rank.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta

import torch.distributed as dist

from lmtrain.distributed.agreement import ranks_text
from lmtrain.errors import LostRank

log = logging.getLogger(__name__)

# What a failed collective says in gloo's and NCCL's RuntimeErrors (torch.distributed.DistError covers the rest)
_COMMUNICATION = ("gloo", "Gloo", "NCCL", "nccl", "Timed out", "timed out", "Connection closed", "Connection reset",
                  "Broken pipe")
_TIMEOUT = ("Timed out", "timed out", "Timeout", "timeout")
ROLL_CALL_GRACE_S = 30.0  # at most: the survivors' timeouts fire within one step of each other


def communication_failure(e: BaseException) -> bool:
    """Whether an exception is a collective or the rendezvous store failing, rather than this rank's own error."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(m in str(e) for m in _COMMUNICATION))


def roll_call(rank: int, size: int, grace_s: float) -> list[int] | None:
    """The ranks that answer within `grace_s`, this one included; None when the store itself does not answer."""
    prefix = f"lmtrain/roll_call/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=grace_s))
        store.set(f"{prefix}/{rank}", "here")
        answered, deadline = store.add(f"{prefix}/count", 1), time.monotonic() + grace_s
        while answered < size and time.monotonic() < deadline:
            time.sleep(0.2)
            answered = store.add(f"{prefix}/count", 0)
        return [r for r in range(size) if store.check([f"{prefix}/{r}"])]
    except (KeyError, ValueError, RuntimeError, dist.DistError) as e:
        log.info("The roll call could not reach the rendezvous store: %s", str(e).splitlines()[0] if str(e) else e)
        return None


def lost_rank(error: BaseException, timeout_s: float, where: str) -> LostRank:
    """The LostRank that a failed collective means, after a roll call of the ranks; `where` says what this rank
    was doing (`at step 12`)."""
    rank, size = dist.get_rank(), dist.get_world_size()
    timed_out = any(m in str(error) for m in _TIMEOUT)
    present = roll_call(rank, size, min(timeout_s, ROLL_CALL_GRACE_S))
    if present is None:
        lost, present = [0], [r for r in range(size) if r != 0]  # the store lives with torchrun's agent or rank 0
        why = "it holds the rendezvous store, which stopped answering too"
    else:
        lost = [r for r in range(size) if r not in present]
        why = ""
    if not lost:  # everyone answered: not a lost rank after all
        lost_what = str(error).splitlines()[0] if str(error) else type(error).__name__
        return LostRank(f"rank {rank} lost contact with the other ranks {where} ({lost_what}), yet all of them "
                        "answered a roll call afterwards; look for another rank's error above")
    if rank != min(present):
        return LostRank("")  # the lowest rank that answered says it
    who = ranks_text(lost).capitalize()
    if timed_out:
        what = (f"{who} stopped answering: rank {rank} waited trainer.dist_timeout_s={timeout_s:g} s for "
                f"{'it' if len(lost) == 1 else 'them'} in a collective {where}")
    else:
        what = f"{who} left the run {where}: {'its' if len(lost) == 1 else 'their'} connections closed"
    return LostRank(f"{what}{f' ({why})' if why else ''}; the other ranks stop here. A rank that crashed printed its "
                    "own error above; once its node is healthy, trainer.resume=auto continues from the last checkpoint")
