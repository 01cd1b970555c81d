"""`lmtrain plot DIR [DIR ...] [metric=val_loss] [out=FILE.png]`: draw runs as PNG files.

One run: its loss.png (train and validation loss, learning rate). Several runs (a sweep, or folders
given together): their validation curves overlaid, and the metric against the swept parameter when
exactly one numeric parameter varies; into DIR/summary.png for one DIR, else `out=` (default runs.png).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from lmtrain.commands.summarize import chosen_runs, warnings_to_stderr
from lmtrain.errors import reports_user_errors

log = logging.getLogger("lmtrain")
USAGE = "usage: lmtrain plot DIR [DIR ...] [metric=val_loss|best_val_loss|train_loss] [out=FILE.png]"


@reports_user_errors
def plot_command(argv: list[str]) -> Path:
    from lmtrain.runs.sweeps.plots import plot_run, plot_runs
    from lmtrain.runs.sweeps.summary import sort_runs, swept_keys

    folders, options, metric, runs = chosen_runs(argv, ("metric", "out"))
    if len(runs) == 1:
        out = Path(options.get("out", runs[0].folder / "loss.png"))
        plot_run(runs[0], out)
    else:
        out = Path(options.get("out", folders[0] / "summary.png" if len(folders) == 1 else "runs.png"))
        runs = sort_runs(runs, metric)
        plot_runs(runs, swept_keys(runs), metric, out)
    print(out)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(USAGE)
        return
    warnings_to_stderr()
    plot_command(sys.argv[1:])
