"""What a run reports: metrics.jsonl records and the final table (lmtrain.runs.records reads them back).

Throughput comes from lmtrain.training.clock, MFU from lmtrain.training.mfu.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.table import Table
from rich.text import Text

from lmtrain.console import job_tag
from lmtrain.runs.loggers import call_guarded, close_all
from lmtrain.runs.records import read_metrics


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl, flushed at once so a crash loses nothing logged.

    Every record gets `elapsed_s`: wall-clock seconds since the log was opened, which the trainer does as
    its setup ends, just before the first step (a resumed run counts from its restart). Time-to-target
    figures, such as a speedrun's, are read from it.
    """

    def __init__(self, path: Path, enabled: bool = True, loggers: list | None = None):
        self.path, self.enabled = path, enabled
        self._file = open(path, "a", encoding="utf-8") if enabled else None
        self._start = time.perf_counter()
        self.loggers = loggers or []  # lmtrain.runs.loggers.RunLogger: each gets every record once it is written

    def write(self, record: dict) -> None:
        if self._file is not None:
            record = {**record, "elapsed_s": round(time.perf_counter() - self._start, 3)}
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            call_guarded(self.loggers, lambda logger: logger.log(record))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            close_all(self.loggers)


def recorded_figures(path: Path) -> tuple[float, float]:
    """A run's last training loss and its training tokens/s over all its logged steps, from its metrics.jsonl:
    what a resumed run that had nothing left to train reports. (nan, 0.0) when there is no training record."""
    records = [r for r in read_metrics(path) if "loss" in r and r.get("tokens_per_s") and "tokens" in r]
    if not records:
        return float("nan"), 0.0
    tokens = [r["tokens"] for r in records]  # cumulative; each record's rate covers those since the one before
    seconds = sum((now - before) / r["tokens_per_s"] for r, now, before in zip(records, tokens, [0, *tokens[:-1]],
                                                                                 strict=True))
    return records[-1]["loss"], tokens[-1] / seconds


def rewind(path: Path, size: int) -> int:
    """Cut a metrics file back to its first `size` bytes (its length when a checkpoint was saved), so a
    resumed run continues it without repeating steps; returns how many records were dropped."""
    if not path.exists() or path.stat().st_size <= size:
        return 0
    with open(path, "rb+") as f:
        f.seek(size)
        dropped = f.read().count(b"\n")
        f.truncate(size)  # one system call: a crash leaves the file whole or cut, never half-cut
    return dropped


def summary_table(rows: list[tuple[str, str]]) -> Table:
    # `[job 3] Training summary`: the tables of parallel jobs say whose they are
    table = Table(title=Text(f"{job_tag()}Training summary"), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # a long path wraps on a narrow terminal instead of ending in "…"
    for key, value in rows:
        table.add_row(Text(key), Text(value))  # plain text: a path such as files=[/x] is not markup
    return table
