"""Summarizing runs: NAME.csv, NAME.md and NAME.png in a folder (NAME: summary, or summary_by_KEY when sorted
another way), the table and the jobs that did not complete on the console.

Used by the sweep callback at the end of a multirun and by `lmtrain summarize` / `lmtrain plot`.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from lmtrain.runs.sweeps.plots import plot_runs
from lmtrain.runs.sweeps.runs import Run, find_runs, read_run
from lmtrain.runs.sweeps.summary import (
    needs_folders,
    outcome_line,
    rows,
    sort_runs,
    swept_keys,
    to_table,
    unfinished_lines,
    write_summary,
)


def read_runs(roots: list[Path]) -> list[Run]:
    return [read_run(folder) for folder in find_runs(roots)]


def summarize(runs: list[Run], folder: Path | None, objective: str, sort: str | None = None,
              earlier: list[Run] | None = None, name: str = "summary") -> None:
    """Print the table and, given a folder, write the summary files into it; `sort` reorders (default: by
    objective, best first). `earlier`: other runs in a sweep's folder, from an earlier sweep, listed apart."""
    from lmtrain.console import console

    runs = sort_runs(runs, sort or objective)
    header, body = rows(runs, folder)
    if folder is not None:
        write_summary(runs, folder, name)
        plot_runs(runs, swept_keys(runs), objective, folder / f"{name}.png")
    title = f"Sweep summary, best {objective} first" if not sort else f"Sweep summary by {sort}"
    # Outside a terminal (a log file, CI) the table keeps its natural width rather than the default 80 columns.
    out = console if console.is_terminal else Console(file=console.file, width=1000, highlight=False)
    out.print(to_table(header, body, title, show_folder=needs_folders(runs)))
    for line in [outcome_line(runs), *unfinished_lines(runs, folder)]:
        out.print(line, markup=False, soft_wrap=True)
    if earlier:
        jobs = sorted(r.job for r in earlier if r.job is not None)
        which = f" (jobs {', '.join(map(str, jobs))})" if len(jobs) == len(earlier) and len(jobs) <= 10 else ""
        where = folder if folder is not None else "this folder"
        out.print(f"Not counted: {len(earlier)} earlier run{'s' if len(earlier) > 1 else ''}{which} in {where}, not "
                  f"launched by this sweep command; `lmtrain summarize {where}` summarizes every run there",
                  markup=False, soft_wrap=True)
    if folder is not None:
        out.print(f"Written: {folder / name}.csv, {name}.md, {name}.png", markup=False, soft_wrap=True)
