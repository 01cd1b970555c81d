"""status.json in each run folder: how the run ended, written atomically by the job itself.

`running` while it trains (and forever, if the process was killed without a chance to write), then
`completed` with its objective, `failed` with the error, `stopped` with the signal, or `diverged`.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lmtrain.errors import LmtrainError, RunStopped
from lmtrain.runs.records import STATUS_FILE, read_status

log = logging.getLogger(__name__)

# The first signal that stopped a job of this process's sweep: later jobs of a sequential sweep do not
# start (Ctrl-C stops the whole sweep, not only the job under way); rerunning the sweep resumes them.
_sweep_stopped_by: signal.Signals | None = None


def _write(run_dir: Path, status: dict) -> None:
    from lmtrain.files import write_json  # imported late: reading statuses never needs torch

    write_json(Path(run_dir) / STATUS_FILE, status)


@dataclass
class JobRecord:
    previous: dict | None  # status.json as an earlier attempt left it (a rerun sweep skips completed jobs)
    facts: dict = field(default_factory=dict)  # what the body learnt: the objective and its value, steps


@contextmanager
def recorded_status(run_dir: Path, job: int | None) -> Iterator[JobRecord]:
    """Run a job, then record how it ended; the body adds the completed run's facts to the record."""
    global _sweep_stopped_by
    base = {} if job is None else {"job": job}
    if _sweep_stopped_by is not None:
        message = f"Not started: the sweep was stopped by {_sweep_stopped_by.name}"
        _write(run_dir, {**base, "status": "stopped", "signal": _sweep_stopped_by.name, "message": message})
        raise RunStopped(_sweep_stopped_by, message)
    record = JobRecord(previous=read_status(run_dir))
    _write(run_dir, {**base, "status": "running"})
    facts = record.facts
    try:
        yield record
    except KeyboardInterrupt:
        _write(run_dir, {**base, "status": "stopped", "signal": "SIGINT"})
        raise
    except RunStopped as e:
        _sweep_stopped_by = _sweep_stopped_by or e.received
        _write(run_dir, {**base, "status": "stopped", "signal": e.received.name, "message": str(e)})
        raise
    except LmtrainError as e:
        _write(run_dir, {**base, "status": e.status, "error": str(e)})
        raise
    except Exception as e:
        _write(run_dir, {**base, "status": "failed", "error": f"{type(e).__name__}: {e}"})
        raise
    _write(run_dir, {**base, "status": "completed", **facts})
