"""scripts/gpu_check.sh on a machine without a usable GPU, and its time budget: its stages' limits add up to the
total its header claims."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's answer without CUDA")


def run_with(tmp_path: Path, nvidia_smi: str | None) -> subprocess.CompletedProcess:
    """The script with PATH holding only a fake nvidia-smi printing `nvidia_smi` (None: no nvidia-smi at all)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if nvidia_smi is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\nprintf '%s\\n' '{nvidia_smi}'\n")
        fake.chmod(0o755)
    path = f"{bin_dir}:{os.path.dirname(sys.executable)}:/usr/bin:/bin"
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": path, "PYTHON": sys.executable,
                               "GPU_CHECK_OUT": str(tmp_path / "out")})


def test_gpus_that_torch_cannot_use_are_a_failure(tmp_path):
    result = run_with(tmp_path, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: nvidia-smi lists GPUs but torch.cuda.is_available() is False" in result.stdout
    assert "GPU 0: NVIDIA H100" in result.stdout and not (tmp_path / "out").exists()


def test_no_gpu_at_all_is_said_in_one_line(tmp_path):
    result = run_with(tmp_path, None)
    assert result.returncode == 0 and result.stdout.count("\n") == 1 and "nothing to check" in result.stdout


def test_the_stage_limits_add_up_to_the_claimed_total():
    text = SCRIPT.read_text()
    limits = {name: int(seconds) for name, seconds in re.findall(r"^stage (\w+) (\d+) ", text, re.MULTILINE)}
    claimed = int(re.search(r"time limits add up to (\d+) s", text)[1])
    minutes = int(re.search(r"takes at most (\d+) minutes", text)[1])
    assert sum(limits.values()) == claimed and claimed <= minutes * 60 < claimed + 60
    # the header's table names every stage with its limit
    for name, seconds in limits.items():
        assert re.search(rf"#\s+{name}\s+{seconds} s", text) or name in ("generate", "eval", "export"), name
    assert re.search(r"#\s+generate, eval, export\s+" + " \\+ ".join(str(limits[n]) for n in
                                                                     ("generate", "eval", "export")), text)
