"""Every file lmtrain reads back from a run folder, read here and checked record by record.

Two kinds of reader, by what a bad file costs:
- strict, for what resuming and loading a model need (a checkpoint's config.json and trainer_state.json):
  anything that is not what lmtrain wrote is a CheckpointError naming the file, and nothing is guessed;
- tolerant, for a run's record (metrics.jsonl, status.json, .hydra/overrides.yaml, .hydra/config.yaml, and
  checkpoints/latest.json, which only points to a step folder): a bad record is skipped with a warning that
  names the file and line, and the rest is used, so the summary of a damaged sweep still prints.

docs/robustness.md lists what each reader tolerates. The token cache's manifest is read by
lmtrain.data.cache, a layer below, with its own checks.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

from lmtrain.errors import CheckpointError

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
LAUNCHED = ".lmtrain-jobs"  # in a sweep folder: job-N.json for each job the latest sweep command there launched
LATEST = "latest.json"  # under RUN/checkpoints: {"step": 500, "folder": "step_000500"}, the newest whole step folder
TRAINER_STATE = "trainer_state.json"
WANDB_RUN_ID = "wandb/lmtrain-run-id"  # the W&B run this folder's run logs to (lmtrain.runs.loggers.wandb)
_STEP_FOLDER = re.compile(r"step_(\d+)")

# metrics.jsonl fields by kind; other keys are kept as they are (newer versions may add some)
_COUNTS = ("step", "epoch", "tokens", "micro_batch_size", "peak_memory", "skipped_steps", "rolled_back_from",
           "rollbacks")  # whole numbers >= 0
_NUMBERS = ("loss", "val_loss", "val_ppl", "lr", "grad_norm", "epoch_avg_loss", "lr_factor")  # NaN/inf allowed
_RATES = ("tokens_per_s", "mfu")  # numbers >= 0, or null while the step time settles
_SECONDS = ("elapsed_s",)  # finite numbers >= 0

_warned: set[str] = set()  # each warning once per process: the loss plot rereads a run's metrics at each eval


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def metrics_problem(record) -> str | None:
    """What is wrong with one metrics.jsonl record, or None when it is one lmtrain could have written."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    if "step" not in record:
        return "no step"
    for key, value in record.items():
        if key in _COUNTS and not _is_count(value):
            return f"{key}={value!r} is not a whole number >= 0"
        if key in _NUMBERS and not _is_number(value):
            return f"{key}={value!r} is not a number"
        if key in _RATES and value is not None and not (_is_number(value) and value >= 0):
            return f"{key}={value!r} is not a number >= 0"
        if key in _SECONDS and not (_is_number(value) and math.isfinite(value) and value >= 0):
            return f"{key}={value!r} is not a number of seconds"
        if key == "samples" and not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
            return "samples is not a list of texts"
    return None


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records, in order. A line that is not UTF-8, not JSON, or not a record lmtrain writes
    (see metrics_problem) is skipped with one warning per file naming the first such line; a last line cut
    short by a crash (no newline at its end) is skipped silently. A missing file has no records."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    torn = lines.pop() if lines else b""  # empty when the file ends with a newline, as every whole record does
    records, bad = [], []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            bad.append(f"line {number}: not UTF-8 text")
            continue
        except ValueError as e:
            bad.append(f"line {number}: not valid JSON ({e})")
            continue
        problem = metrics_problem(record)
        if problem is None:
            records.append(record)
        else:
            bad.append(f"line {number}: {problem}")
    if torn.strip():
        log.debug("%s: the last line is cut short (a crash while writing it); skipped", path)
    if bad:
        _warn_once(f"Skipped {len(bad)} bad record{'s' if len(bad) > 1 else ''} in {path}; the first: {bad[0]}")
    return records


# status.json's fields and their types; `status` is required
_STATUS_FIELDS = {"status": str, "job": int, "error": str, "signal": str, "message": str, "objective": str,
                  "value": float, "steps": int, "folder": str}


def read_status(run_dir: Path, name: str = STATUS_FILE) -> dict | None:
    """A run folder's status.json (lmtrain.runs.sweeps.status writes it), or None when there is none. A file
    that is not a JSON object with a `status` is ignored with a warning; a field of the wrong type is dropped."""
    path = Path(run_dir) / name
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        _warn_once(f"Ignoring {path}: it is not readable JSON ({str(e).splitlines()[0]})")
        return None
    if not isinstance(status, dict) or not isinstance(status.get("status"), str):
        _warn_once(f"Ignoring {path}: it is not a status record (a JSON object with a status)")
        return None
    wrong = [k for k, kind in _STATUS_FIELDS.items() if k in status and status[k] is not None
             and not (_is_number(status[k]) if kind is float else isinstance(status[k], kind)
                      and not isinstance(status[k], bool))]
    if wrong:
        _warn_once(f"{path}: ignoring {', '.join(wrong)}, of the wrong type")
    return {k: v for k, v in status.items() if k not in wrong}


def read_launched(sweep_dir: Path) -> list[dict]:
    """The jobs the latest sweep command in `sweep_dir` launched, by job number: each a status record (see
    read_status) naming its `folder`, relative to the sweep folder. A damaged entry is left out, with a warning."""
    jobs = []
    for path in sorted((Path(sweep_dir) / LAUNCHED).glob("job-*.json")):
        entry = read_status(path.parent, path.name)
        if entry is None:
            continue
        if not isinstance(entry.get("folder"), str) or not isinstance(entry.get("job"), int):
            _warn_once(f"Ignoring {path}: it names no job folder")
            continue
        jobs.append(entry)
    return sorted(jobs, key=lambda e: e["job"])


def _read_yaml(path: Path, what: str):
    """A YAML file's content; None, with a warning, when it cannot be read or parsed."""
    import yaml  # PyYAML, which Hydra installs

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except yaml.MarkedYAMLError as e:
        where = f"line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}: " if e.problem_mark else ""
        _warn_once(f"Ignoring {path} ({what}): {where}{e.problem or e.context}")
        return None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        _warn_once(f"Ignoring {path} ({what}): {str(e).splitlines()[0]}")
        return None


def read_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides Hydra saved in .hydra/overrides.yaml (a list of `key=value` texts)."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    items = _read_yaml(path, "the run's overrides")
    if items is None:
        return []
    if not isinstance(items, list):
        _warn_once(f"Ignoring {path} (the run's overrides): not a list")
        return []
    kept = [item for item in items if isinstance(item, str) and "=" in item]
    if len(kept) < len(items):
        _warn_once(f"{path}: ignoring {len(items) - len(kept)} entries that are not key=value texts")
    return kept


def _flatten(tree, prefix: str = "") -> dict[str, str]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: _text(tree)} if prefix else {}
    out: dict[str, str] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def _text(value) -> str:
    """A config value as a command line would give it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def read_settings(run_dir: Path) -> dict[str, str]:
    """Every setting the run used, as `key: value` texts: the resolved config Hydra saved in .hydra/config.yaml
    (`optimizer.lr`), and the group choices of .hydra/hydra.yaml (`model: gpt_small`)."""
    folder = Path(run_dir) / ".hydra"
    settings = _flatten(_read_yaml(folder / "config.yaml", "the run's config") or {})
    hydra = _read_yaml(folder / "hydra.yaml", "Hydra's settings of the run") or {}
    choices = hydra.get("hydra", {}).get("runtime", {}).get("choices", {}) if isinstance(hydra, dict) else {}
    if isinstance(choices, dict):
        settings.update({k: _text(v) for k, v in choices.items() if "/" not in k and not k.startswith("hydra")})
    return settings


def read_tags(run_dir: Path) -> list[str]:
    """The run's `tags=[...]`, from the config Hydra saved in .hydra/config.yaml; none when it has none (a damaged
    file: with a warning)."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    config = _read_yaml(path, "the run's config")
    tags = config.get("tags") if isinstance(config, dict) else None
    if tags is None:
        return []
    if not isinstance(tags, list):
        _warn_once(f"Ignoring the tags in {path}: not a list")
        return []
    return [_text(t) for t in tags]


def read_wandb_id(run_dir: Path) -> str | None:
    """The W&B run id saved in the run folder; None when there is none, or (with a warning) a damaged one."""
    path = Path(run_dir) / WANDB_RUN_ID
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        _warn_once(f"Ignoring {path}: {e}; this run logs to a new W&B run")
        return None
    if not re.fullmatch(r"[a-z0-9]{1,64}", text):
        _warn_once(f"Ignoring {path}: {text[:40]!r} is not a W&B run id; this run logs to a new W&B run")
        return None
    return text


# --- checkpoint files: strict -------------------------------------------------------------------------------


def read_json(file: Path) -> dict:
    """A JSON object from a checkpoint file; anything else is a CheckpointError naming the file."""
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is corrupt: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} is corrupt: expected a JSON object")
    return data


# trainer_state.json: whole numbers >= 0, and numbers that may be null (a run that has not evaluated yet)
_STATE_COUNTS = ("step", "total_steps", "epoch", "tokens", "epoch_steps", "metrics_bytes")
_STATE_NUMBERS = ("epoch_loss_sum", "val_loss", "best_val_loss")


def read_trainer_state(folder: Path) -> dict:
    """A step folder's trainer_state.json: the loop's counters, the loader position, metrics.jsonl's length."""
    file = Path(folder) / TRAINER_STATE
    if not file.is_file():
        raise CheckpointError(f"{folder} is not a checkpoint: it has no {TRAINER_STATE} (a step folder under "
                              "RUN/checkpoints holds it beside the weights and the optimizer state)")
    state = read_json(file)
    if not _is_count(state.get("step")) or not isinstance(state.get("loader"), dict):
        raise CheckpointError(f"{file} is corrupt: it has no step or loader position")
    for key in _STATE_COUNTS:
        if key in state and not _is_count(state[key]):
            raise CheckpointError(f"{file} is corrupt: {key}={state[key]!r} is not a whole number >= 0")
    for key in _STATE_NUMBERS:
        if state.get(key) is not None and not _is_number(state[key]):
            raise CheckpointError(f"{file} is corrupt: {key}={state[key]!r} is not a number")
    return state


def step_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) for every step folder under RUN/checkpoints, newest first."""
    if not Path(root).is_dir():
        return []
    found = [(int(m[1]), p) for p in Path(root).iterdir() if (m := _STEP_FOLDER.fullmatch(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def read_latest(root: Path) -> int | None:
    """The step checkpoints/latest.json names; None when there is none, or, with a warning, when it is damaged
    (the step folders then speak for themselves)."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    try:
        step = read_json(pointer).get("step")
    except CheckpointError as e:
        log.warning("Ignoring %s (%s); trying the step folders newest first", pointer, e)
        return None
    if not _is_count(step):
        log.warning("Ignoring %s (its step is %r, not a whole number); trying the step folders newest first",
                    pointer, step)
        return None
    return step


def step_candidates(root: Path) -> list[Path]:
    """Step folders to try, newest first: the one latest.json names, then older ones."""
    folders = step_folders(root)
    newest = read_latest(root)
    if newest is None:
        return [f for _, f in folders]
    for step, folder in folders:
        if step > newest:
            log.info("Ignoring %s: its save never finished (latest.json names step %d)", folder.name, newest)
    return [Path(root) / f"step_{newest:06d}"] + [f for step, f in folders if step < newest]
