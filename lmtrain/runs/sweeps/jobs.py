"""A sweep job's own business: its folder name, and whether a rerun can skip it."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from omegaconf import OmegaConf

from lmtrain.runs.records import read_metrics
from lmtrain.runs.sweeps.runs import objective_value, short_value

_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]+")
NAME_LIMIT = 160  # characters of overrides kept in a job folder's name (file names stop at 255 bytes)


def job_folder_name(num: int | str, overrides: list[str], exclude_keys: list[str]) -> str:
    """`3_optimizer.lr=0.001,trainer.batch_size=8`: the job number, then its overrides in the order typed, less
    the excluded keys and any value that is a path, numbers a search drew rounded (short_value), made safe as a
    file name (no `/`, brackets, quotes or spaces); a long name is cut and given a short hash of the whole."""
    kept = [f"{key}={short_value(value)}" for key, _, value in (o.partition("=") for o in overrides)
            if key.lstrip("+~") not in exclude_keys and "/" not in value]
    text = ",".join(kept)
    name = _UNSAFE.sub("_", text).strip("_")
    if len(name) > NAME_LIMIT:
        name = name[:NAME_LIMIT - 9] + "_" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return f"{num}_{name}" if name else str(num)


def register_job_name_resolver() -> None:
    """For train.yaml's hydra.sweep.subdir:
    `${lmtrain_job_name:${hydra.job.num},${hydra.overrides.task},${hydra.job.config.override_dirname.exclude_keys}}`
    """
    OmegaConf.register_new_resolver("lmtrain_job_name", lambda num, overrides, exclude: job_folder_name(
        num, list(overrides), list(exclude)), replace=True)


def finished_objective(run_dir: Path, previous: dict | None, objective: str) -> float | None:
    """The objective of a job that completed before (`previous`, its status.json, says so), else None."""
    if previous is None or previous.get("status") != "completed":
        return None
    return objective_value(read_metrics(Path(run_dir) / "metrics.jsonl"), objective)
