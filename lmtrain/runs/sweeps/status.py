"""status.json in each run folder: how the run ended, written atomically by the job itself.

`running` while it trains (and forever, if the process was killed without a chance to write), then
`completed` with its objective, `failed` with the error, `stopped` with the signal, `diverged`, or
`requeued` when its scheduler (submitit) put it back in the queue after a preemption signal.
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lmtrain.errors import LmtrainError, RunStopped

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"

# The first signal that stopped a job of this process's sweep: later jobs of a sequential sweep do not
# start (Ctrl-C stops the whole sweep, not only the job under way); rerunning the sweep resumes them.
_sweep_stopped_by: signal.Signals | None = None


def read_status(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write(run_dir: Path, status: dict) -> None:
    from lmtrain.files import write_json  # imported late: reading statuses never needs torch

    write_json(Path(run_dir) / STATUS_FILE, status)


@dataclass
class JobRecord:
    previous: dict | None  # status.json as an earlier attempt left it (a rerun sweep skips completed jobs)
    facts: dict = field(default_factory=dict)  # what the body learnt: the objective and its value, steps


def record_requeue(run_dir: Path, job: int | None, received: signal.Signals, step: int) -> None:
    """Before a scheduler requeues a stopped job (it ends the process): the next attempt reads `requeued` here,
    and continues from the checkpoint."""
    _write(run_dir, {**({} if job is None else {"job": job}), "status": "requeued", "signal": received.name,
                     "steps": step})


@contextmanager
def recorded_status(run_dir: Path, job: int | None, writes: bool = True) -> Iterator[JobRecord]:
    """Run a job, then record how it ended; the body adds the completed run's facts to the record. writes: false
    on the ranks other than 0 of a run that torchrun or srun started (rank 0 keeps the record)."""
    global _sweep_stopped_by
    base = {} if job is None else {"job": job}
    write = _write if writes else lambda run_dir, status: None
    if _sweep_stopped_by is not None:
        message = f"Not started: the sweep was stopped by {_sweep_stopped_by.name}"
        write(run_dir, {**base, "status": "stopped", "signal": _sweep_stopped_by.name, "message": message})
        raise RunStopped(_sweep_stopped_by, message)
    record = JobRecord(previous=read_status(run_dir))
    write(run_dir, {**base, "status": "running"})
    facts = record.facts
    try:
        yield record
    except KeyboardInterrupt:
        write(run_dir, {**base, "status": "stopped", "signal": "SIGINT"})
        raise
    except RunStopped as e:
        _sweep_stopped_by = _sweep_stopped_by or e.received
        write(run_dir, {**base, "status": "stopped", "signal": e.received.name, "message": str(e)})
        raise
    except LmtrainError as e:
        write(run_dir, {**base, "status": e.status, "error": str(e)})
        raise
    except Exception as e:
        write(run_dir, {**base, "status": "failed", "error": f"{type(e).__name__}: {e}"})
        raise
    write(run_dir, {**base, "status": "completed", **facts})
