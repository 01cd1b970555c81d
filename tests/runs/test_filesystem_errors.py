"""One boundary for filesystem failures: every OSError is one line naming the path and the fix, exit code 2."""

from __future__ import annotations

import errno
import logging

import pytest
import torch
from safetensors import SafetensorError

from lmtrain import files
from lmtrain.errors import USER_ERROR_EXIT, filesystem_error, reports_user_errors
from lmtrain.runs import checkpoint

from conftest import run_cli


@pytest.mark.parametrize("number, fix", [
    (errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"), (errno.EACCES, "permission denied"),
    (errno.ENOTDIR, "a file stands where a folder should be"),
])
def test_each_failure_names_the_path_and_the_fix(number, fix, caplog):
    @reports_user_errors
    def command():
        raise OSError(number, "what the system said", "/data/run/checkpoints")

    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        command()
    assert exit_info.value.code == USER_ERROR_EXIT
    (line,) = caplog.text.strip().splitlines()
    assert "what the system said at /data/run/checkpoints" in line and fix in line


def test_a_full_disk_inside_safetensors_is_the_oserror_it_is(tmp_path, monkeypatch):
    def full(*_, **__):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError) as e:
        checkpoint.save_tensors({"w": torch.zeros(2)}, tmp_path / "model.safetensors", {})
    assert e.value.errno == errno.ENOSPC and "No space left" in filesystem_error(e.value)


def test_a_half_written_checkpoint_folder_is_removed_and_the_old_one_stays(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_text("the previous weights")

    def fails(folder):
        (folder / "part").write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "part"))

    with pytest.raises(OSError):
        files.write_folder(tmp_path / "final", fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert (tmp_path / "final" / "model.safetensors").read_text() == "the previous weights"


def test_cli_cache_folder_that_is_a_file(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    result = run_cli("prepare", f"data.cache_dir={blocker}/sub", "data.max_documents=5", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output[-2000:]
    assert f"{blocker}" in output and "a file stands where a folder should be" in output
