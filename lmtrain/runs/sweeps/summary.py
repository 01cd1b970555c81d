"""A sweep's summary: one row per run, best first by the objective, as summary.csv, summary.md and a rich table;
then the jobs that did not complete, each with its error on one line."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from rich.table import Table
from rich.text import Text

from lmtrain.runs.sweeps.runs import OBJECTIVES, Run, short_value

# (column, what it shows) after the job number and the swept overrides
COLUMNS = ("status", "val_loss", "best_val_loss", "best_step", "train_loss", "steps", "tokens", "wall_s",
           "tokens_per_s", "error")
ERROR_CELL = 60  # characters of an error in the table and summary.md; summary.csv and status.json hold it whole
ERROR_LINE = 300  # characters of an error in the list of jobs that did not complete


def swept_keys(runs: list[Run]) -> list[str]:
    """The override keys whose values differ between runs (all of a lone run's overrides); a run that did not
    override a key counts with the value it resolved."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    if len(runs) < 2:
        return keys
    return [k for k in keys if len({r.value(k) for r in runs}) > 1]


def sort_runs(runs: list[Run], key: str) -> list[Run]:
    """Best first by an objective (lower is better), runs without one last; or ascending by any other column."""
    if key in OBJECTIVES:
        return sorted(runs, key=lambda r: (r.metric(key) is None, r.metric(key) or 0.0, r.job or 0))

    def value(r: Run):
        v = getattr(r, key, None) if key in COLUMNS or key == "job" else r.value(key) or None
        try:
            return (v is None, False, float(v), "")
        except (TypeError, ValueError):
            return (v is None, True, 0.0, str(v))  # text after numbers

    return sorted(runs, key=value)


def one_line(text: str, limit: int) -> str:
    """The first line of a message, cut to `limit` characters."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit - 1] + "…"


def said(run: Run) -> str:
    """The run's error, its own folder's long path in it written as "its folder"."""
    return run.error.replace(str(run.folder.resolve()), "its folder") if run.error else ""


def _cell(value, exact: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # tags
        return ", ".join(value)
    if isinstance(value, float):
        return repr(value) if exact else f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def _folder(run: Run, root: Path | None) -> str:
    """The run's folder, relative to the summary's folder (or the working folder) where it lies under it."""
    base = Path(root) if root is not None else Path.cwd()
    try:
        return str(run.folder.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(run.folder)


def rows(runs: list[Run], root: Path | None = None, exact: bool = False) -> tuple[list[str], list[list[str]]]:
    """The header and each run's cells: numbers as metrics.jsonl has them and whole errors (exact, for the csv), or
    rounded, with short errors."""
    keys = swept_keys(runs)
    # tags and the step of an early stop, when some run has them
    columns = [*(["tags"] if any(r.tags for r in runs) else []), *COLUMNS,
               *(["stopped_early"] if any(r.stopped_early for r in runs) else [])]
    header = ["job", "run", *keys, *columns]
    out = []
    for r in runs:
        values = [r.value(k) if exact else short_value(r.value(k)) for k in keys]
        cells = {c: _cell(getattr(r, c), exact) for c in columns}
        cells["error"] = r.error if exact else one_line(said(r), ERROR_CELL)
        out.append([_cell(r.job, exact), _folder(r, root), *values, *(cells[c] for c in columns)])
    return header, out


def to_csv(header: list[str], body: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(body)
    return buffer.getvalue()


def to_markdown(header: list[str], body: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(b) for b in body)]) + "\n"


def to_table(header: list[str], body: list[list[str]], title: str, show_folder: bool = False) -> Table:
    """The rich table; every cell is plain text, never parsed as markup (paths and values may hold `[`).
    The run folder shows when the job numbers alone do not tell the runs apart."""
    table = Table(title=Text(title), title_justify="left")
    hidden = {"tokens"} | (set() if show_folder else {"run"})  # keep the console table narrow
    shown = [i for i, h in enumerate(header) if h not in hidden]
    for i in shown:
        table.add_column(Text(header[i]), justify="left" if header[i] in ("run", "status", "error") else "right",
                         overflow="fold")
    for cells in body:
        style = "" if cells[header.index("status")] == "completed" else "red"
        table.add_row(*(Text(cells[i]) for i in shown), style=style)
    return table


def needs_folders(runs: list[Run]) -> bool:
    """Whether job numbers fail to tell the runs apart: runs made by hand, or jobs of several sweeps."""
    jobs = [r.job for r in runs]
    return None in jobs or len(set(jobs)) < len(jobs)


def write_summary(runs: list[Run], folder: Path, name: str = "summary") -> None:
    """NAME.csv (numbers and errors exact, as the runs recorded them) and NAME.md (rounded) in `folder`."""
    from lmtrain.files import write_text

    write_text(Path(folder) / f"{name}.csv", to_csv(*rows(runs, folder, exact=True)))
    write_text(Path(folder) / f"{name}.md", to_markdown(*rows(runs, folder)))


def outcome_line(runs: list[Run]) -> str:
    """`3 jobs: 2 completed, 1 failed`."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items(), key=lambda kv: kv[0] != "completed"))
    return f"{len(runs)} job{'s' if len(runs) != 1 else ''}: {parts}"


def _why(run: Run) -> str:
    if run.status == "not started":
        return f"not started (the sweep was stopped by {run.signal})" if run.signal else "not started"
    if run.status == "stopped":
        return f"stopped by {run.signal}" if run.signal else "stopped"
    if run.status == "running":
        return "running (still under way, or killed without a chance to record how it ended)"
    return f"{run.status}: {one_line(said(run), ERROR_LINE)}" if run.error else run.status


def unfinished_lines(runs: list[Run], root: Path | None) -> list[str]:
    """The jobs that did not complete, one line each, and how to continue a stopped sweep."""
    unfinished = sorted((r for r in runs if r.status != "completed"), key=lambda r: (r.job is None, r.job or 0))
    if not unfinished:
        return []
    lines = [f"{'Job' if len(unfinished) == 1 else 'Jobs'} that did not complete (the details are in each job "
             "folder's train.log):"]
    for r in unfinished:
        who = f"job {r.job}" if r.job is not None and not needs_folders(runs) else _folder(r, root)
        lines.append(f"  {who}: {_why(r)}")
    resume = next((r.error for r in unfinished if r.status == "stopped" and "trainer.resume=auto" in r.error), None)
    if resume:
        lines.append(resume.strip())
    return lines
