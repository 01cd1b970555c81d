"""Killing, stopping and resuming `lmtrain train` through the real CLI, against one uninterrupted run."""

import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmtrain.runs.metrics import read_metrics

from conftest import FAST_TRAIN, ONE_THREAD, TINY_MODEL, read_until, run_cli, start

pytestmark = pytest.mark.slow

# 40 steps with dropout (so the RNG state matters), validation every 10 steps, a checkpoint every 20.
RUN = [*TINY_MODEL, *FAST_TRAIN, "model.dropout=0.1", "trainer.max_steps=40", "trainer.eval_every=10",
       "trainer.save_every=20"]
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("reference")
    result = run_cli("train", *RUN, f"hydra.run.dir={run}", env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    return run


def logged(run: Path) -> list[dict]:
    """metrics.jsonl without the timing fields, which differ between any two runs."""
    timing = ("tokens_per_s", "mfu", "elapsed_s")
    return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(run / "metrics.jsonl")]


def assert_same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for name in x:
        assert torch.equal(x[name], y[name]), name


def test_sigkill_then_resume_auto_matches_the_uninterrupted_run_bit_for_bit(tmp_path, reference):
    run = tmp_path / "run"
    proc = start(*RUN, "trainer.resume=auto", f"hydra.run.dir={run}")
    output = read_until(proc, "Saved checkpoint", "step_000020")
    proc.kill()  # SIGKILL: no handler runs, nothing gets flushed or tidied
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert "trainer.resume=auto: no checkpoint in" in output and "yet; starting fresh" in output
    assert not (run / "checkpoints/final").exists()

    result = run_cli("train", *RUN, "trainer.resume=auto", f"hydra.run.dir={run}", env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Resuming from {run}/checkpoints/step_000020 at step 20" in result.stdout
    records = logged(run)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))  # each step once: appended, not redone
    assert records == logged(reference)  # every loss, learning rate, gradient norm and validation loss, exactly
    assert_same_tensors(run / "checkpoints/final/model.safetensors", reference / "checkpoints/final/model.safetensors")
    for name in ("model", "optimizer"):
        assert_same_tensors(run / f"checkpoints/step_000040/{name}.safetensors",
                            reference / f"checkpoints/step_000040/{name}.safetensors")


def test_sigterm_finishes_the_step_saves_and_prints_a_resume_command_that_works(tmp_path, reference):
    run = tmp_path / "run"
    proc = start(*RUN, f"hydra.run.dir={run}")
    read_until(proc, "Epoch 0, Batch 5,")
    proc.send_signal(signal.SIGTERM)
    output = proc.stdout.read()
    assert proc.wait() == 128 + signal.SIGTERM, output
    assert "SIGTERM received: stopping after this step, then saving a checkpoint" in output
    assert "Stopped by SIGTERM at step" in output and "Traceback" not in output
    command = output.split("Continue this run with:\n", 1)[1].splitlines()[0].strip()
    args = shlex.split(command)
    assert args[:4] == ["lmtrain", "train", "trainer.resume=auto", f"hydra.run.dir={run}"]
    assert set(RUN) <= set(args[4:])

    result = run_cli(*args[1:], env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert logged(run) == logged(reference)
    assert_same_tensors(run / "checkpoints/final/model.safetensors", reference / "checkpoints/final/model.safetensors")


def test_ctrl_c_stops_after_saving_with_exit_status_130(tmp_path):
    run = tmp_path / "run"
    proc = start(*RUN, "trainer.max_steps=100000", f"hydra.run.dir={run}")
    read_until(proc, "Epoch 0, Batch 3,")
    proc.send_signal(signal.SIGINT)
    output = proc.stdout.read()
    assert proc.wait() == 130, output
    assert "SIGINT received: stopping after this step, then saving a checkpoint (Ctrl-C again to abort once" \
        in output
    step = read_metrics(run / "metrics.jsonl")[-1]["step"]
    assert f"Stopped by SIGINT at step {step} of 100000" in output
    assert (run / f"checkpoints/step_{step:06d}/trainer_state.json").is_file()


def test_crash_script_survives_two_kills(tmp_path):
    # The full-disk and two-process cases need root and over a minute more: run by hand (docs/robustness.md).
    result = subprocess.run([sys.executable, str(SCRIPTS / "crash_test.py"), "--kills", "2", "--steps", "30",
                             "--workdir", str(tmp_path), "--no-extra-cases"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "final weights equal the uninterrupted run's: yes" in result.stdout
    assert "RESULT: PASS" in result.stdout


def test_resuming_another_runs_finished_checkpoint_in_a_new_folder_trains_nothing_and_exits_0(tmp_path, reference):
    """Its objective is the checkpoint's own validation loss: the new folder's metrics.jsonl has none."""
    result = run_cli("train", *RUN, f"trainer.resume={reference}/checkpoints/step_000040",
                     f"hydra.run.dir={tmp_path / 'again'}", env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "This run finished at step 40 already: nothing left to train" in result.stdout
    assert "diverged" not in result.stdout + result.stderr


def test_extending_a_finished_run_keeps_its_schedule_and_says_what_the_lr_does(tmp_path):
    """trainer.max_steps raised on a finished run: the cosine schedule is not stretched (the LR would jump back
    up); the added steps train at the LR the schedule ended with, and a warning names it."""
    run = tmp_path / "run"
    short = [*TINY_MODEL, *FAST_TRAIN, "trainer.eval_every=100", "scheduler.warmup_steps=2", f"hydra.run.dir={run}"]
    assert run_cli("train", *short, "trainer.max_steps=8", env=ONE_THREAD).returncode == 0
    longer = run_cli("train", *short, "trainer.max_steps=14", "trainer.resume=auto", env=ONE_THREAD)
    assert longer.returncode == 0, longer.stdout + longer.stderr
    lrs = {r["step"]: r["lr"] for r in read_metrics(run / "metrics.jsonl") if "lr" in r}
    assert sorted(lrs) == list(range(1, 15))
    assert lrs[8] < lrs[7] and all(lrs[step] == lrs[8] for step in range(9, 15))  # no jump: the end LR stays
    out = " ".join(longer.stdout.split())
    assert ("The run's length changed from 8 to 14 steps (trainer.max_steps / trainer.epochs), but its learning-rate "
            f"schedule keeps the 8 steps it was planned with: steps 9-14 train at its final LR, {lrs[8]:.2e}") in out
    # a later resume of the extension (after a crash, say) keeps the same schedule: its checkpoint says so
    state = json.loads((run / "checkpoints" / "step_000014" / "trainer_state.json").read_text())
    assert (state["total_steps"], state["schedule_steps"]) == (14, 8)
