"""A run's record on disk, and reading it back.

- run_dir.py: one run per folder, locked while it trains, no folder left behind by a failed start;
- checkpoint.py: checkpoint folders (atomic, never unpickled) and the step folders under RUN/checkpoints;
- trained.py: which checkpoint a path means (best, latest, final; a transformers folder, hf:<repo id>), loaded
  for generate, eval and export, and read as model.init_from's starting point;
- metrics.py: metrics.jsonl and the end-of-run table;
- records.py: every file read back from a run folder, checked record by record;
- loggers/: loss.png, TensorBoard and W&B, fed each metrics record;
- sweeps/: status.json, reading run folders, a sweep's summary and plots, Hydra's sweep callback.

The names below are imported on first use: the command line reads run folders (statuses, metrics) before
it imports torch, which checkpoint.py and trained.py need.
"""

import importlib

_EXPORTS = {"open_run_dir": "run_dir", "MetricsLog": "metrics", "read_metrics": "records",
            "save_checkpoint": "checkpoint", "load_weights": "checkpoint", "TrainedModel": "trained",
            "load_trained": "trained", "resolve_checkpoint": "trained"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
