"""Summarizing runs: summary.csv, summary.md and summary.png in a folder, the table on the console.

Used by the sweep callback at the end of a multirun and by `lmtrain summarize` / `lmtrain plot`.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from lmtrain.runs.sweeps.plots import plot_runs
from lmtrain.runs.sweeps.runs import Run, find_runs, read_run
from lmtrain.runs.sweeps.summary import outcome_line, rows, sort_runs, swept_keys, to_table, write_summary


def read_runs(roots: list[Path]) -> list[Run]:
    return [read_run(folder) for folder in find_runs(roots)]


def summarize(runs: list[Run], folder: Path | None, objective: str, sort: str | None = None) -> None:
    """Print the table and, given a folder, write the summary files into it; `sort` reorders (default: by
    objective, best first)."""
    from lmtrain.console import console

    runs = sort_runs(runs, sort or objective)
    header, body = rows(runs, folder)
    if folder is not None:
        write_summary(runs, folder)
        plot_runs(runs, swept_keys(runs), objective, folder / "summary.png")
    title = f"Sweep summary, best {objective} first" if not sort else f"Sweep summary by {sort}"
    # Outside a terminal (a log file, CI) the table keeps its natural width rather than the default 80 columns.
    out = console if console.is_terminal else Console(file=console.file, width=1000, highlight=False)
    out.print(to_table(header, body, title))
    out.print(outcome_line(runs), markup=False)
    if folder is not None:
        out.print(f"Written: {folder / 'summary.csv'}, summary.md, summary.png", markup=False)
