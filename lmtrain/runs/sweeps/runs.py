"""A run folder read back: its swept overrides (.hydra/overrides.yaml), status.json and metrics.jsonl, each
through lmtrain.runs.records.

Every figure here comes from metrics.jsonl, the run's own record; nothing is re-measured.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from lmtrain.runs import records

# What a sweep can optimize, each read from metrics.jsonl (trainer.objective names one; lower is better).
OBJECTIVES = ("val_loss", "best_val_loss", "train_loss")

# Overrides that say where or how a job ran, not what it trained: left out of job names and summaries.
UNINTERESTING_KEYS = ("hydra.", "trainer.resume", "trainer.progress", "data.cache_dir")


@dataclass
class Run:
    """One run's facts, as its folder records them."""

    folder: Path
    job: int | None = None  # the job number in its sweep, when it was one
    overrides: dict[str, str] = field(default_factory=dict)  # key -> value as given on the command line
    status: str = "-"  # completed, failed, stopped, diverged, running, not started; "-": no status.json
    tags: list[str] = field(default_factory=list)  # the run's tags=[...], from its .hydra/config.yaml
    error: str = ""  # what stopped it: the error, or the message of a stop
    signal: str = ""  # the signal that stopped it (stopped, not started)
    val_loss: float | None = None  # the last validation loss
    best_val_loss: float | None = None
    best_step: int | None = None  # the step of best_val_loss
    train_loss: float | None = None  # the last logged training loss
    steps: int = 0
    tokens: int = 0
    wall_s: float = 0.0  # training wall time, summed over restarts
    tokens_per_s: float | None = None  # mean of the logged training throughputs
    stopped_early: int | None = None  # the step trainer.early_stopping ended the run at
    val_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val_loss)
    train_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    lr_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, lr)
    settings: dict[str, str] | None = field(default=None, repr=False)  # every setting it used, read when needed

    def metric(self, name: str) -> float | None:
        value = getattr(self, name)
        return value if value is not None and math.isfinite(value) else None

    def value(self, key: str) -> str:
        """The value of a setting: as overridden on the command line, else as the run resolved it."""
        if key in self.overrides:
            return self.overrides[key]
        if self.settings is None:
            self.settings = records.read_settings(self.folder)
        return self.settings.get(key, "")


def short_value(text: str) -> str:
    """A number written with many digits (a value a search drew: 0.0012345678901) to 4 significant digits;
    anything else as it is."""
    digits = re.sub(r"[eE].*$", "", text).lstrip("+-").replace(".", "").lstrip("0")
    if len(digits) <= 6 or not re.search(r"[.eE]", text):
        return text
    try:
        return f"{float(text):.4g}"
    except ValueError:
        return text


def run_from_metrics(metrics: list[dict]) -> Run:
    """What these metrics.jsonl records say of a run: its figures, and the step it stopped early at (if so)."""
    run = Run(Path("."))
    _fill_from_metrics(run, metrics)
    return run


def objective_value(metrics: list[dict], objective: str) -> float | None:
    """The value of `objective` for a run with these metrics.jsonl records (None when it has none)."""
    return run_from_metrics(metrics).metric(objective)


def _fill_from_metrics(run: Run, metrics: list[dict]) -> None:
    previous_elapsed = 0.0
    segment_end = 0.0
    for r in metrics:
        elapsed = r.get("elapsed_s")
        if elapsed is not None:
            if elapsed < previous_elapsed:  # a resumed run's clock restarts: close the earlier segment
                run.wall_s += segment_end
            previous_elapsed = segment_end = elapsed
        if "val_loss" in r:
            run.val_curve.append((r["step"], r["val_loss"]))
        if r.get("stopped_early"):
            run.stopped_early = r["step"]
        if "loss" in r:
            run.train_curve.append((r["step"], r["loss"]))
            run.steps, run.tokens = r["step"], r.get("tokens", run.tokens)
            if "lr" in r:
                run.lr_curve.append((r["step"], r["lr"]))
    run.wall_s += segment_end
    if run.stopped_early is not None and run.stopped_early < run.steps:  # resumed past it with a larger patience
        run.stopped_early = None
    if run.val_curve:
        run.val_loss = run.val_curve[-1][1]
        finite = [(loss, step) for step, loss in run.val_curve if loss is not None and math.isfinite(loss)]
        if finite:
            run.best_val_loss, run.best_step = min(finite)
    if run.train_curve:
        run.train_loss = run.train_curve[-1][1]
    speeds = [r["tokens_per_s"] for r in metrics if r.get("tokens_per_s") is not None]  # null while warming up
    run.tokens_per_s = sum(speeds) / len(speeds) if speeds else None


def _job_number(folder: Path) -> int | None:
    head = folder.name.split("_", 1)[0]
    return int(head) if head.isdigit() else None


def read_overrides(folder: Path) -> dict[str, str]:
    """The run's command-line overrides (.hydra/overrides.yaml), less those that say only where it ran."""
    out = {}
    for item in records.read_overrides(folder):
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if not key.startswith(UNINTERESTING_KEYS):
            out[key] = value
    return out


def read_run(folder: Path) -> Run:
    folder = Path(folder)
    run = Run(folder, job=_job_number(folder), overrides=read_overrides(folder), tags=records.read_tags(folder))
    status = records.read_status(folder)
    if status is not None:
        run.status, run.job = status["status"], status.get("job", run.job)
        run.error, run.signal = status.get("error") or status.get("message", ""), status.get("signal", "")
    _fill_from_metrics(run, records.read_metrics(folder / "metrics.jsonl"))
    return run


def is_run_folder(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("metrics.jsonl", "status.json", ".hydra/overrides.yaml"))


def find_runs(roots: list[Path]) -> list[Path]:
    """Every run folder at or under each root (a run, a sweep, a folder of sweeps), in a stable order."""
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        if is_run_folder(root) and not (root / "multirun.yaml").exists():
            found.append(root)
            continue
        candidates = {p.parent for name in ("metrics.jsonl", "status.json") for p in root.rglob(name)}
        candidates |= {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")}
        found += sorted((c for c in candidates if "checkpoints" not in c.relative_to(root).parts),
                        key=lambda p: (_job_number(p) is None, _job_number(p) or 0, str(p)))
    return list(dict.fromkeys(found))
