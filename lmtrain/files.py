"""Files written atomically: a reader, or a crash, sees the old content or the new, never a mix.

A folder is written into a temporary sibling, each file flushed to disk, then renamed into place;
`recover` tidies what a crash in between leaves. Every layer that writes files goes through here
(checkpoints, token caches, status files, measured-speed caches, exports).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# `.NAME.tmp123`: being written; `.NAME.old123`: being replaced; `.NAME.trash123`: being deleted (123: a pid).
_SCRATCH = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|trash)(?P<pid>\d+)")


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give each file in `folder` the mode the user's umask asks for. safetensors writes 0600 whatever the
    umask, which would hide a run's checkpoints from colleagues on a shared cluster."""
    mode = 0o666 & ~current_umask()
    for f in Path(folder).iterdir():
        if f.is_file():
            os.chmod(f, mode)


def write_folder(path: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling of `path` with `write(tmp)`, flush it, and rename it to `path`, replacing
    any folder there."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        apply_umask(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
    except BaseException:  # a full disk, say: the half-written copy goes, the previous folder stays whole
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    if path.exists():
        os.replace(path, old)  # a folder cannot be renamed over a non-empty one; `recover` undoes a crash here
    os.replace(tmp, path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def remove_folder(path: Path) -> None:
    """Delete a folder; it leaves its name first, so a crash midway never leaves half of it under that name."""
    trash = path.with_name(f".{path.name}.trash{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash)


def write_json(path: Path, obj: Any, allow_nan: bool = False) -> None:
    """Write a JSON file atomically: a reader sees the old content or the new, never a mix. allow_nan: write
    NaN and Infinity as JavaScript does (results of a diverged model), not refuse them."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=allow_nan))


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically: a reader sees the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _running_elsewhere(pid: int) -> bool:
    """Whether `pid` is another process that is running now (on this machine)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists is checked
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to another user
        return True
    return True


def recover(folder: Path) -> None:
    """Tidy what a crash during a save left in `folder`: a folder caught between being moved aside and
    its successor arriving is put back; unfinished and half-deleted copies are removed. What a process that
    is still running is writing (its PID ends the name) is left alone."""
    for p in Path(folder).glob(".*"):
        m = _SCRATCH.fullmatch(p.name)
        if m is None:
            continue
        if _running_elsewhere(int(m["pid"])):
            log.warning("Leaving %s alone: process %s, which is writing it, is still running", p, m["pid"])
            continue
        target = p.with_name(m["name"])
        if m["kind"] == "old" and not target.exists():
            os.replace(p, target)
            log.warning("Restored %s, which an interrupted save had moved aside", target)
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
