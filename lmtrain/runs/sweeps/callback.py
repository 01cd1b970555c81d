"""The Hydra callback that ends every `lmtrain train -m` sweep with its summary and exit status (train.yaml).

The summary covers the jobs this sweep command launched (each records itself: lmtrain.runs.sweeps.status);
other runs in the sweep folder, an earlier sweep's, are listed apart. The exit status: 0 when every job
completed, or when a search (Optuna) finished its trials; 1 when a job of a grid did not complete, or a
search stopped early (max_failure_rate); 128 + the signal when a signal stopped the sweep (130 for Ctrl-C).

Hydra calls on_multirun_end only when the sweeper returns. When it raises instead (Optuna past its
max_failure_rate, a second Ctrl-C), `lmtrain train` calls `finish_sweep` as it unwinds, so every sweep
leaves a summary, whichever way it ended.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lmtrain.errors import JobFailed, is_search
from lmtrain.runs.records import read_launched
from lmtrain.runs.sweeps.report import read_runs, summarize
from lmtrain.runs.sweeps.runs import Run, read_run
from lmtrain.runs.sweeps.status import forget_launched

log = logging.getLogger(__name__)

_pending: SweepSummary | None = None  # a sweep that started and has no summary yet


class _RecordedFailure(JobReturn):
    """A failed job whose error the job has logged and recorded already: a search sweeper still sees it fail
    (Optuna counts it towards max_failure_rate), without Hydra printing "Error executing job" for it."""

    @property
    def return_value(self) -> Any:
        raise self._return_value

    @return_value.setter
    def return_value(self, value: Any) -> None:
        self._return_value = value


class SweepSummary(Callback):
    def __init__(self, objective: str = "val_loss"):
        self.objective = objective
        self.sweep_dir: Path | None = None
        self.search = False  # the sweeper scores jobs (Optuna): failed trials are part of the search
        self.max_failure_rate: float | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        objective = config.get("trainer", {}).get("objective", self.objective)
        self.objective = getattr(objective, "value", objective)  # the schema makes it an Enum
        target = str(config.hydra.sweeper.get("_target_", ""))
        self.search, self.max_failure_rate = is_search(target), config.hydra.sweeper.get("max_failure_rate")
        if "optuna" in target:
            _quiet_optuna()
        forget_launched(self.sweep_dir)
        global _pending
        _pending = self

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.FAILED and isinstance(job_return._return_value, JobFailed):
            job_return.__class__ = _RecordedFailure

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        code = self._finish(finished=True)
        if code:
            raise SystemExit(code)  # an Exception would only be a warning

    def _finish(self, finished: bool) -> int:
        """Write and show the summary; returns the sweep's exit status. `finished`: the sweeper returned."""
        global _pending
        _pending = None
        if self.sweep_dir is None or not self.sweep_dir.is_dir():
            return 0 if finished else 1
        launched = read_launched(self.sweep_dir)
        runs = [_as_launched(read_run(self.sweep_dir / job["folder"]), job) for job in launched]
        mine = {r.folder.resolve() for r in runs}
        earlier = [r for r in read_runs([self.sweep_dir]) if r.folder.resolve() not in mine]
        if not runs:  # no job recorded itself (a launcher on another filesystem?): every run in the folder
            runs, earlier = earlier, []
        if not runs:
            return 0 if finished else 1
        try:
            summarize(runs, self.sweep_dir, self.objective, earlier=earlier)
        except Exception:  # a summary must never hide how the sweep itself went
            log.exception("Could not write the sweep summary in %s", self.sweep_dir)
        return self._exit_status(runs, finished)

    def _exit_status(self, runs: list[Run], finished: bool) -> int:
        signals = [r.signal for r in runs if r.signal]
        if signals:
            return 128 + signal.Signals[signals[0]]  # as a shell reports a process ended by that signal
        failed = sum(r.status != "completed" for r in runs)
        if not finished:
            if self.search and failed:
                log.error("The search stopped early: more than hydra.sweeper.max_failure_rate=%s of a batch of "
                          "trials failed", self.max_failure_rate)
            return 1
        return 0 if self.search or not failed else 1


def _as_launched(run: Run, job: dict) -> Run:
    """A run as this sweep's attempt at it ended: a refused start leaves the folder's own record (an earlier
    run's) as it was, but the summary says what happened to the job this time."""
    run.job, run.status, run.signal = job["job"], job["status"], job.get("signal", "")
    run.error = job.get("error") or job.get("message", "")
    return run


def _quiet_optuna() -> None:
    """Optuna's import logs alembic's plugin set-up, and Optuna a coloured line of its own: neither helps."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def finish_sweep() -> None:
    """Summarize a sweep that ended by an exception (Hydra skipped on_multirun_end), and exit with its status
    (an unexpected exception goes on, to show its traceback); nothing otherwise. Called as `lmtrain train`
    unwinds."""
    if _pending is not None:
        code = _pending._finish(finished=False)
        under_way = sys.exc_info()[1]  # what is unwinding: Hydra's exit, Ctrl-C, or a crash to show as it is
        if under_way is None or isinstance(under_way, SystemExit | KeyboardInterrupt):
            raise SystemExit(code)
