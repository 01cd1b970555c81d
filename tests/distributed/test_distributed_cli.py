"""Two gloo processes on the CPU against one: DDP and FSDP2 through `lmtrain train trainer.nproc_per_node=2` and
torchrun, stopping on a signal, surviving a killed rank, and resuming at another world size.

Every run uses the same global batch of 8 sequences (1 rank x 8 or 2 ranks x 4) and stays inside the
30-step LR warm-up, where the learning rate does not depend on trainer.max_steps: a run started with a
large max_steps (so that a signal reaches it mid-run) matches the 20-step reference step for step.
"""

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from lmtrain.runs.metrics import read_metrics

from conftest import (
    DIST_COMMON,
    ONE_RANK,
    ONE_THREAD,
    TORCHRUN,
    TWO_RANKS,
    assert_losses_match,
    read_until,
    run_cli,
    start,
    step_losses,
)

pytestmark = pytest.mark.slow


def assert_close_weights(a: Path, b: Path, tol: float) -> None:
    x, y = (load_file(str(run / "checkpoints/final/model.safetensors")) for run in (a, b))
    assert x.keys() == y.keys()
    for name in x:
        torch.testing.assert_close(x[name], y[name], rtol=0, atol=tol, msg=name)


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """A worker of `trainer.nproc_per_node`; elastic launch starts them in local-rank order (their RANK is
    set after the start, so it is not in the process's initial environment)."""
    workers = [c for c in psutil.Process(launcher.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    assert len(workers) == 2, workers
    return sorted(workers, key=lambda p: (p.create_time(), p.pid))[rank]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> tuple[Path, str]:
    """Two DDP processes started by lmtrain itself, batch 4 each."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    result = run_cli("train", *TWO_RANKS, "trainer.nproc_per_node=2", f"hydra.run.dir={run}", env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    return run, result.stdout


def test_ddp_on_two_ranks_matches_one_rank_with_the_same_global_batch(one_rank_reference, ddp):
    run, output = ddp
    assert_losses_match(run, one_rank_reference, range(1, 21), 1e-5)
    val = [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    ref_val = [r["val_loss"] for r in read_metrics(one_rank_reference / "metrics.jsonl") if "val_loss" in r]
    assert val == pytest.approx(ref_val, abs=1e-5)
    assert_close_weights(run, one_rank_reference, 1e-5)
    # rank 0 alone reports: one summary, one set of log lines, one log file
    assert output.count("Training summary") == 1 and output.count("Epoch 0, Batch 20,") == 1
    assert "Strategy ddp: 2 processes on 1 node" in output
    assert [p.name for p in run.glob("*.log")] == ["train.log"]
    assert (run / "train.log").read_text().count("Epoch 0, Batch 20,") == 1


def test_torchrun_fsdp_resumes_a_one_rank_fsdp_checkpoint_into_one_shared_run_dir(one_rank_reference, tmp_path):
    # FSDP2 on one process matches the plain one-process run; its sharded checkpoint then continues on two ranks
    one = tmp_path / "fsdp1"
    result = run_cli("train", *ONE_RANK, "trainer.strategy=fsdp", f"hydra.run.dir={one}", env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_losses_match(one, one_rank_reference, range(1, 21), 1e-4)
    assert (one / "checkpoints/step_000010/shards").is_dir()

    # no hydra.run.dir: the ranks must agree on one timestamped folder themselves
    result = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "lmtrain", "train", *TWO_RANKS,
                             "trainer.strategy=fsdp", f"trainer.resume={one}/checkpoints/step_000010"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, **ONE_THREAD})
    assert result.returncode == 0, result.stdout + result.stderr
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs
    assert_losses_match(runs[0], one_rank_reference, range(11, 21), 1e-4)
    assert_close_weights(runs[0], one_rank_reference, 1e-4)
    assert [p.name for p in runs[0].iterdir() if p.name.startswith(".")] == [".hydra"]
    assert (runs[0] / "train.log").read_text().count("Epoch 0, Batch 20,") == 1  # rank 1 keeps no log file


def test_sigterm_to_one_rank_stops_every_rank_at_one_step_and_resumes_on_one_rank(one_rank_reference, tmp_path):
    run = tmp_path / "run"
    # eval_every=1 slows each step, so the signal lands well before step 20; a large max_steps keeps it running
    proc = start(*TWO_RANKS, "trainer.strategy=fsdp", "trainer.nproc_per_node=2", "trainer.eval_every=1",
                 "trainer.max_steps=100000", f"hydra.run.dir={run}")
    read_until(proc, "Epoch 0, Batch 2,")
    rank_process(proc, 1).send_signal(signal.SIGTERM)
    output = proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, output
    assert "Traceback" not in output
    assert output.count("Stopped by SIGTERM at step") == 1 and output.count("Continue this run with:") == 1
    step = int(output.split("Stopped by SIGTERM at step ")[1].split()[0])
    assert 2 <= step < 20
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == [f"step_{step:06d}"]
    assert sorted(p.name for p in (run / f"checkpoints/step_{step:06d}/shards").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert_losses_match(run, one_rank_reference, range(1, step + 1), 1e-4)  # FSDP2 on two ranks

    command = shlex.split(output.split("Continue this run with:\n", 1)[1].splitlines()[0])
    assert command[:4] == ["lmtrain", "train", "trainer.resume=auto", f"hydra.run.dir={run}"]
    # the same run on one rank (later overrides win): the same global batch, the steps left of the reference
    result = run_cli(*command[1:], "trainer.nproc_per_node=1", "trainer.batch_size=8", "trainer.max_steps=20",
                     "trainer.eval_every=10", env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Resuming from {run}/checkpoints/step_{step:06d} at step {step}" in result.stdout
    assert_losses_match(run, one_rank_reference, range(1, 21), 1e-4)
    assert_close_weights(run, one_rank_reference, 1e-4)


def test_a_killed_rank_restarts_the_workers_once_then_ends_the_run_within_60_s_and_resume_auto_repeats_it(
        ddp, tmp_path):
    run = tmp_path / "run"
    # eval_every=1 slows each step, so the second kill lands well before step 20's checkpoint
    proc = start(*TWO_RANKS, "trainer.nproc_per_node=2", "trainer.max_steps=100000", "trainer.resume=auto",
                 "trainer.max_restarts=1", "trainer.eval_every=1", f"hydra.run.dir={run}")
    read_until(proc, "Saved checkpoint", "step_000010")
    rank_process(proc, 1).kill()  # trainer.max_restarts=1: the launcher says which rank failed, and restarts
    read_until(proc, "Rank 1 was killed by SIGKILL; restarting all workers from the last checkpoint (restart 1 of 1)")
    read_until(proc, "Resuming from", "step_000010 at step 10")
    read_until(proc, "Epoch 0, Batch 11,")
    workers = [rank_process(proc, 0), rank_process(proc, 1)]
    workers[1].kill()  # no restart left
    killed = time.monotonic()
    output = proc.stdout.read()
    assert proc.wait(timeout=60) != 0, output
    psutil.wait_procs(workers, timeout=max(1.0, 60 - (time.monotonic() - killed)))
    assert time.monotonic() - killed < 60 and not any(w.is_running() for w in workers)
    assert "Rank 1 was killed by SIGKILL; the other workers were stopped" in output

    result = run_cli("train", *TWO_RANKS, "trainer.nproc_per_node=2", "trainer.resume=auto", f"hydra.run.dir={run}",
                     env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Resuming from {run}/checkpoints/step_000010 at step 10" in result.stdout
    assert step_losses(run) == step_losses(ddp[0])  # every step once, each loss exactly the uninterrupted run's


def test_hsdp_on_four_ranks_as_two_replicas_of_two_shards_matches_ddp(ddp, tmp_path):
    """HSDP on a 2 x 2 mesh (4 ranks x batch 2: the same global batch of 8) against DDP's 2 x 4, for the first
    steps (inside the warm-up the LR does not depend on max_steps); its checkpoint reshards onto one process."""
    run = tmp_path / "hsdp"
    # under torchrun: trainer.nproc_per_node refuses to start more CPU processes than this machine has cores
    result = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=4", "-m", "lmtrain", "train",
                             *DIST_COMMON, "trainer.batch_size=2", "trainer.max_steps=4", "trainer.save_every=2",
                             "trainer.eval_every=2", "trainer.strategy=hsdp", "trainer.hsdp_shard_size=2",
                             "trainer.reshard_after_forward=false", f"hydra.run.dir={run}"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, **ONE_THREAD})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Strategy hsdp: 4 processes on 1 node" in result.stdout + result.stderr
    assert_losses_match(run, ddp[0], range(1, 5), 1e-5)
    assert len(list((run / "checkpoints/step_000002/shards").glob("*.safetensors"))) == 4

    one = run_cli("train", *DIST_COMMON, "trainer.batch_size=8", "trainer.max_steps=4", "trainer.eval_every=2",
                  f"trainer.resume={run}/checkpoints/step_000002", f"hydra.run.dir={tmp_path / 'one'}", env=ONE_THREAD)
    assert one.returncode == 0, one.stdout + one.stderr
    assert_losses_match(tmp_path / "one", ddp[0], range(3, 5), 1e-5)
