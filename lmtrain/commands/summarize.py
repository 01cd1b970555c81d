"""`lmtrain summarize DIR [DIR ...] [metric=val_loss] [sort=KEY] [out=DIR]`: the summary of any runs.

DIR is a run, a sweep (finished, unfinished, any launcher's) or a folder of them; with one DIR the files
(summary.csv, summary.md, summary.png) go into it, with several into `out=` (else only the table shows).
Ranked another way (metric= or sort=), they are named summary_by_KEY.*, so a sweep's own summary stays.
Not a Hydra app: it reads run folders and makes none.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from lmtrain.errors import ConfigError, reports_user_errors
from lmtrain.runs.sweeps.runs import OBJECTIVES

_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")  # characters kept in a file name
USAGE = "usage: lmtrain summarize DIR [DIR ...] [metric=val_loss|best_val_loss|train_loss] [sort=KEY] [out=DIR]"


def parse_args(argv: list[str], options: tuple[str, ...]) -> tuple[list[Path], dict[str, str]]:
    """Folders and key=value options; an unknown option or a missing folder is a user error."""
    folders, values = [], {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in options:
            values[key] = value
        elif sep and not Path(arg).exists():
            raise ConfigError(f"unknown option {key}= (known: {', '.join(o + '=' for o in options)})\n{USAGE}")
        elif not Path(arg).is_dir():
            raise ConfigError(f"{arg}: no such folder\n{USAGE}")
        else:
            folders.append(Path(arg))
    if not folders:
        raise ConfigError(f"name at least one run or sweep folder\n{USAGE}")
    return folders, values


def chosen_runs(argv: list[str], options: tuple[str, ...]) -> tuple[list[Path], dict[str, str], str, list]:
    """What `summarize` and `plot` share: the folders, the options, the checked metric and the runs found."""
    from lmtrain.runs.sweeps.report import read_runs

    folders, values = parse_args(argv, options)
    metric = values.get("metric", "val_loss")
    if metric not in OBJECTIVES:
        raise ConfigError(f"metric={metric} must be one of {', '.join(OBJECTIVES)}")
    runs = read_runs(folders)
    if not runs:
        raise ConfigError(f"no runs (folders with metrics.jsonl or status.json) under {' '.join(map(str, folders))}")
    return folders, values, metric, runs


@reports_user_errors
def summarize_command(argv: list[str]) -> None:
    from lmtrain.runs.sweeps.report import summarize

    folders, options, metric, runs = chosen_runs(argv, ("metric", "sort", "out"))
    out = Path(options["out"]) if "out" in options else folders[0] if len(folders) == 1 else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    ranked_by = options.get("sort") or (metric if "metric" in options else None)
    name = "summary" if ranked_by in (None, "val_loss") else "summary_by_" + _UNSAFE.sub("_", ranked_by)
    summarize(runs, out, metric, sort=options.get("sort"), name=name)


def warnings_to_stderr() -> None:
    """Warnings (a damaged record skipped, naming its file and line) on stderr, beside the table on stdout."""
    import logging

    from lmtrain.console import make_console_handler

    logging.getLogger().addHandler(make_console_handler(stderr=True))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(USAGE)
        return
    warnings_to_stderr()
    summarize_command(sys.argv[1:])
