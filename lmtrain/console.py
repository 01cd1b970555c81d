"""The one terminal console: log lines and the live progress bar share it, so neither garbles the other.

On a terminal, logs go through rich above a live bar; elsewhere (CI, pipes, SLURM logs) they are plain
one-line records and there is no bar at all.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from rich.console import Console
from rich.logging import RichHandler
from rich.measure import Measurement
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lmtrain.errors import in_multirun

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)  # for commands whose stdout is their output (generate)


def print_table(table) -> None:
    """A table on stdout: on a terminal as wide as the terminal (long cells wrap); elsewhere (a log file, a pipe)
    at its full width, where rich would otherwise cut every row at 80 columns."""
    if console.is_terminal:
        console.print(table)
        return
    width = Measurement.get(console, console.options.update_width(10_000), table).maximum
    Console(file=console.file, width=max(width, console.width), highlight=False).print(table)


class _RankFormatter(logging.Formatter):
    """Messages as `fmt` gives them; in a run of several processes, `[rank 3] ` before every line a rank other
    than 0 prints (they print only warnings and errors) and before rank 0's errors, so each names its rank."""

    def __init__(self, fmt: str):
        super().__init__(fmt)
        env = os.environ
        self.rank = int(env.get("RANK", env.get("SLURM_PROCID", "0")) or 0)  # SLURM_PROCID: srun started it
        self.several = int(env.get("WORLD_SIZE", env.get("SLURM_STEP_NUM_TASKS", "1")) or 1) > 1

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tagged = self.several and (self.rank != 0 or record.levelno >= logging.ERROR)
        return f"[rank {self.rank}] {text}" if tagged else text


class _PlainFormatter(_RankFormatter):
    """`HH:MM:SS message`, with the level named only when it is a warning or worse."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        return f"[{self.formatTime(record, '%H:%M:%S')}] {level}{text}"


def job_tag() -> str:
    """`[job 3] ` in a job of a multirun, so the lines of parallel jobs can be told apart; else ``."""
    if not in_multirun():
        return ""
    from hydra.core.hydra_config import HydraConfig

    return f"[job {HydraConfig.get().job.get('num', '?')}] "


def parallel_job() -> bool:
    """A job of a multirun whose launcher may run jobs side by side (anything but Hydra's basic launcher)."""
    if not in_multirun():
        return False
    from hydra.core.hydra_config import HydraConfig

    return "BasicLauncher" not in str(HydraConfig.get().launcher.get("_target_", ""))


def make_console_handler(stderr: bool = False) -> logging.Handler:
    """The terminal log handler; Hydra's job_logging config builds it with `(): lmtrain.console.make_console_handler`.

    stderr: log there, leaving stdout to a command's output (`lmtrain generate > out.txt` keeps only the text).
    """
    target = err_console if stderr else console
    message = job_tag().replace("%", "%%") + "%(message)s"  # a sweep job's lines carry its number
    if target.is_terminal:
        handler: logging.Handler = RichHandler(console=target, show_path=False, markup=False,
                                               rich_tracebacks=False, log_time_format="[%X]")
        handler.setFormatter(_RankFormatter(message))
    else:
        handler = logging.StreamHandler(sys.stderr if stderr else sys.stdout)
        handler.setFormatter(_PlainFormatter(message))
    # Only rank 0 talks; other ranks of a distributed run report problems only.
    handler.setLevel(logging.INFO if handler.formatter.rank == 0 else logging.WARNING)
    return handler


def quiet_libraries() -> None:
    """One copy of each library message, and no noise in logs.

    huggingface_hub prints its warnings (each retry of an unreachable hub, say) through a stderr handler of
    its own and again through ours: its own goes. Outside a terminal, datasets' progress bars only add noise.
    """
    from huggingface_hub.utils import logging as hub_logging  # not `datasets`: half a second to import

    hub_logging.get_logger()  # the hub's logger configured now, with the handler that goes below
    if not console.is_terminal:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is first imported
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
    hub = logging.getLogger("huggingface_hub")
    for handler in [h for h in hub.handlers if type(h) is logging.StreamHandler]:
        hub.removeHandler(handler)


def wants_progress_bar(setting: bool | None, target: Console = console) -> bool:
    """A live bar on a terminal, none elsewhere nor in jobs run side by side, unless the config forces it."""
    return target.is_terminal and not parallel_job() if setting is None else setting


WIDE_TERMINAL = 110  # columns from which the bar also shows MFU and the elapsed time


def progress_bar(enabled: bool, target: Console = console) -> Progress:
    """Step, loss, lr, tokens/s, MFU, elapsed time and the ETA (the task's `eta` field: the run's own, which the log
    lines show too). On a terminal narrower than WIDE_TERMINAL, a shorter bar without MFU and elapsed time, so
    that the ETA always shows whole. A disabled bar draws nothing but accepts the same calls."""
    wide = target.width >= WIDE_TERMINAL
    columns = [TextColumn("{task.description}", style="bold", markup=False),  # a description may name a path
               BarColumn(bar_width=30 if wide else 10), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss [cyan]{task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
               TextColumn("{task.fields[speed]} tok/s")]
    if wide:
        columns += [TextColumn("MFU {task.fields[mfu]}"), TimeElapsedColumn()]
    return Progress(*columns, TextColumn("ETA {task.fields[eta]}"), console=target, disable=not enabled,
                    transient=False)


def count_bar(enabled: bool) -> Progress:
    """A plain bar for work counted in items (evaluation windows), on stderr beside the commands' log lines."""
    return Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=err_console, disable=not enabled)


class PreparationProgress:
    """Tokenization progress, one bar per source and split; with no bar, a log line every `log_every` seconds.

    Called with each `lmtrain.data.cache.Progress` report.
    """

    def __init__(self, enabled: bool, target: Console = console, log_every: float = 30.0):
        self.bar = Progress(
            TextColumn("{task.description}", style="bold", markup=False),  # a description may name a path
            BarColumn(),
            TextColumn("{task.fields[documents]} documents"),
            TextColumn("{task.fields[tokens]} tokens"),
            TextColumn("{task.fields[speed]} tok/s"),
            TimeElapsedColumn(),
            console=target,
            disable=not enabled,
        )
        self.enabled, self.log_every = enabled, log_every
        self.tasks: dict[str, tuple[int, float, int]] = {}  # description -> (task id, start time, tokens then)
        self.last_log = time.perf_counter()

    def __enter__(self) -> PreparationProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def __call__(self, p) -> None:
        name = f"{p.source} {p.split}"
        now = time.perf_counter()
        if name not in self.tasks:
            total = p.max_tokens or p.total_documents  # None: a stream of unknown length
            self.tasks[name] = (self.bar.add_task(name, total=total, documents=0, tokens=0, speed="-"), now, p.tokens)
        task, start, tokens_then = self.tasks[name]
        speed = (p.tokens - tokens_then) / max(now - start, 1e-9)
        self.bar.update(task, completed=p.tokens if p.max_tokens else p.documents, documents=f"{p.documents:,}",
                        tokens=f"{p.tokens:,}", speed=f"{speed:,.0f}")
        if not self.enabled and now - self.last_log >= self.log_every:
            self.last_log = now
            logging.getLogger("lmtrain").info("Tokenizing %s: %s documents, %s tokens, %s tokens/s",
                                              name, f"{p.documents:,}", f"{p.tokens:,}", f"{speed:,.0f}")
