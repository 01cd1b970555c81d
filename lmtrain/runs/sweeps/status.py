"""status.json in each run folder: how the run in it ended, written atomically by the job itself; and each sweep
command's record of the jobs it launched.

`running` while it trains (and forever, if the process was killed without a chance to write), then
`completed` with its objective, `failed` with the error, `stopped` with the signal, `diverged`, `requeued` when
its scheduler (submitit) put it back in the queue after a preemption signal, or `not started` (the sweep was
stopped before this job's turn). Only the job that holds its folder (lmtrain.runs.run_dir's lock) writes there,
or, in a folder without one yet, a start that failed before it could hold it: a start refused because its folder
holds an earlier run, or because another process trains there, leaves the earlier record as it was. Of the ranks
that torchrun or srun started, rank 0 alone writes.

Every job of a sweep also records how this attempt ended in the sweep folder's .lmtrain-jobs/, which each sweep
command empties as it starts: the end-of-sweep summary covers those jobs, and lists the folder's other runs
(an earlier sweep's) apart.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lmtrain.errors import LmtrainError, RunStopped
from lmtrain.files import write_json
from lmtrain.runs.records import LAUNCHED, STATUS_FILE, read_status

log = logging.getLogger(__name__)

NOT_STARTED = "not started"

# The first signal that stopped a job of this process's sweep: later jobs of a sequential sweep do not
# start (Ctrl-C stops the whole sweep, not only the job under way); rerunning the sweep resumes them.
_sweep_stopped_by: signal.Signals | None = None


def forget_launched(sweep_dir: Path) -> None:
    """A new sweep command starts in `sweep_dir`: the jobs an earlier one launched are no longer this sweep's."""
    shutil.rmtree(Path(sweep_dir) / LAUNCHED, ignore_errors=True)


@dataclass
class JobRecord:
    run_dir: Path
    job: int | None  # the job number in its sweep; None for a single run
    sweep_dir: Path | None  # where the sweep records the jobs it launched; None outside a sweep
    previous: dict | None  # status.json as an earlier attempt left it (a rerun sweep skips completed jobs)
    facts: dict = field(default_factory=dict)  # what the body learnt: the objective and its value, steps
    holds_folder: bool = False  # the job holds its folder's lock: status.json is its own to write
    writes: bool = True  # false on the ranks other than 0 of a run that torchrun or srun started

    def claimed(self) -> None:
        """The job holds its folder now (it trains there): it says so."""
        self.holds_folder = True
        self.record({"status": "running"})

    def requeued(self, received: signal.Signals, steps: int) -> None:
        """Before a scheduler requeues the stopped job (it ends this process): the next attempt reads `requeued`
        and continues from the checkpoint."""
        self.record({"status": "requeued", "signal": received.name, "steps": steps})

    def record(self, outcome: dict) -> None:
        """Write how the job stands: into status.json when the folder is the job's (see the module docstring),
        and into the sweep's record of the jobs it launched."""
        if not self.writes:
            return
        base = {} if self.job is None else {"job": self.job}
        if self.holds_folder or self.previous is None:
            write_json(Path(self.run_dir) / STATUS_FILE, {**base, **outcome})
        if self.sweep_dir is not None:
            folder = os.path.relpath(self.run_dir, self.sweep_dir)
            (self.sweep_dir / LAUNCHED).mkdir(parents=True, exist_ok=True)
            write_json(self.sweep_dir / LAUNCHED / f"job-{self.job}.json", {**base, "folder": folder, **outcome})


@contextmanager
def recorded_status(run_dir: Path, job: int | None, sweep_dir: Path | None = None,
                    writes: bool = True) -> Iterator[JobRecord]:
    """Run a job, then record how it ended; the body calls `claimed()` once it holds the folder, and adds the
    completed run's facts to the record. `sweep_dir`: the sweep's folder, for a job of a sweep. writes: false on
    the ranks other than 0 of a run that torchrun or srun started (rank 0 keeps the record)."""
    global _sweep_stopped_by
    record = JobRecord(Path(run_dir), job, None if sweep_dir is None else Path(sweep_dir), read_status(run_dir),
                       writes=writes)
    if _sweep_stopped_by is not None:
        message = f"Not started: the sweep was stopped by {_sweep_stopped_by.name}"
        record.record({"status": NOT_STARTED, "signal": _sweep_stopped_by.name, "message": message})
        raise RunStopped(_sweep_stopped_by, message)
    record.record({"status": "running"})
    try:
        yield record
    except KeyboardInterrupt:
        record.record({"status": "stopped", "signal": "SIGINT"})
        raise
    except RunStopped as e:
        _sweep_stopped_by = _sweep_stopped_by or e.received
        record.record({"status": "stopped", "signal": e.received.name, "message": str(e)})
        raise
    except LmtrainError as e:
        record.record({"status": e.status, "error": str(e)})
        raise
    except Exception as e:
        record.record({"status": "failed", "error": f"{type(e).__name__}: {e}"})
        raise
    record.record({"status": "completed", **record.facts})
