"""A sweep's summary: one row per run, best first by the objective, as summary.csv, summary.md and a rich table."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from rich.table import Table
from rich.text import Text

from lmtrain.runs.sweeps.runs import OBJECTIVES, Run

# (column, what it shows) after the job number and the swept overrides
COLUMNS = ("status", "val_loss", "best_val_loss", "best_step", "train_loss", "steps", "tokens", "wall_s",
           "tokens_per_s", "error")


def swept_keys(runs: list[Run]) -> list[str]:
    """The override keys whose values differ between runs (all of a lone run's overrides)."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    if len(runs) < 2:
        return keys
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def sort_runs(runs: list[Run], key: str) -> list[Run]:
    """Best first by an objective (lower is better), runs without one last; or ascending by any other column."""
    if key in OBJECTIVES:
        return sorted(runs, key=lambda r: (r.metric(key) is None, r.metric(key) or 0.0, r.job or 0))

    def value(r: Run):
        v = r.overrides.get(key) if key in r.overrides else getattr(r, key, None)
        try:
            return (v is None, False, float(v), "")
        except (TypeError, ValueError):
            return (v is None, True, 0.0, str(v))  # text after numbers

    return sorted(runs, key=value)


def _cell(value, exact: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # tags
        return ", ".join(value)
    if isinstance(value, float):
        return repr(value) if exact else f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def rows(runs: list[Run], root: Path | None = None, exact: bool = False) -> tuple[list[str], list[list[str]]]:
    """The header and each run's cells: numbers as metrics.jsonl has them (exact, for the csv) or rounded."""
    keys = swept_keys(runs)
    # tags and the step of an early stop, when some run has them
    columns = [*(["tags"] if any(r.tags for r in runs) else []), *COLUMNS,
               *(["stopped_early"] if any(r.stopped_early for r in runs) else [])]
    header = ["job", "run", *keys, *columns]
    out = []
    for r in runs:
        name = os.path.relpath(r.folder, root) if root is not None else str(r.folder)
        out.append([_cell(r.job, exact), name, *(r.overrides.get(k, "") for k in keys),
                    *(_cell(getattr(r, c), exact) for c in columns)])
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


def to_table(header: list[str], body: list[list[str]], title: str) -> Table:
    """The rich table; every cell is plain text, never parsed as markup (paths and values may hold `[`)."""
    table = Table(title=Text(title), title_justify="left")
    shown = [i for i, h in enumerate(header) if h not in ("run", "tokens")]  # keep the console table narrow
    for i in shown:
        table.add_column(Text(header[i]), justify="left" if header[i] in ("status", "error") else "right",
                         overflow="fold")
    for cells in body:
        style = "" if cells[header.index("status")] == "completed" else "red"
        table.add_row(*(Text(cells[i]) for i in shown), style=style)
    return table


def write_summary(runs: list[Run], folder: Path) -> None:
    """summary.csv (numbers exact, as in metrics.jsonl) and summary.md (rounded) in `folder`, in the runs' order."""
    from lmtrain.files import write_text

    write_text(Path(folder) / "summary.csv", to_csv(*rows(runs, folder, exact=True)))
    write_text(Path(folder) / "summary.md", to_markdown(*rows(runs, folder)))


def outcome_line(runs: list[Run]) -> str:
    """`3 jobs: 2 completed, 1 failed`."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items(), key=lambda kv: kv[0] != "completed"))
    return f"{len(runs)} job{'s' if len(runs) != 1 else ''}: {parts}"
