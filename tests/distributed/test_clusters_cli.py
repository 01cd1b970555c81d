"""Runs left alone on a cluster, on 2 gloo processes through the real CLI: a preempted submitit job requeued and
finished, resume commands that keep the launcher, ranks that disagree stopped in one line, a lost rank named,
workers that die with their launcher, Muon under FSDP2 and a damaged sharded checkpoint.

As in test_distributed_cli.py (conftest.DIST_COMMON), 2 ranks x batch 4 train on the sequences 1 rank x batch 8
does, and every run stays inside the 30-step LR warm-up, so a run started with a large trainer.max_steps (a
signal reaches it mid-run) matches the 20-step reference step for step.
"""

import fcntl
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lmtrain.runs.sweeps.status import read_status

from conftest import (
    ONE_THREAD,
    TORCHRUN,
    TWO_RANKS,
    assert_losses_match,
    free_port,
    read_until,
    run_cli,
    start,
    step_losses,
)

pytestmark = pytest.mark.slow

SLOW_STEPS = ["trainer.eval_every=1", "trainer.max_steps=100000"]  # every step evaluates: a signal lands mid-run


def descendants(proc: subprocess.Popen, fragment: str) -> list[psutil.Process]:
    """The processes below `proc` whose command line holds `fragment`, oldest first."""
    found = [p for p in psutil.Process(proc.pid).children(recursive=True) if fragment in " ".join(p.cmdline())]
    return sorted(found, key=lambda p: (p.create_time(), p.pid))


def wait_for(condition, timeout: float = 300, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.1)


# ---- 1. preemption under submitit: the job is requeued and the run finishes as if never stopped ----------------


def test_a_preempted_submitit_job_is_requeued_and_finishes_with_the_uninterrupted_losses(one_rank_reference, tmp_path):
    sweep = tmp_path / "sweep"
    # hydra/launcher=submitit_local with a one-minute limit: its controller sends the task SIGUSR2 30 s before the
    # limit, and starts the job again when the task exits with submitit's requeue code
    proc = start("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=1", "trainer.nproc_per_node=2",
                 *TWO_RANKS, "trainer.eval_every=1", f"hydra.sweep.dir={sweep}")

    def trained(steps: int) -> bool:
        metrics = next(sweep.glob("0_*/metrics.jsonl"), None)
        return metrics is not None and len(step_losses(metrics.parent)) >= steps

    wait_for(lambda: trained(2), what="the job's first steps")
    # what the controller does at the time limit less signal_delay_s, sent now rather than a minute into the job
    # (submitit's own LocalJob._interrupt does the same); a slow second attempt gets the real one and is requeued again
    descendants(proc, "submitit.core._submit")[0].send_signal(signal.SIGUSR2)
    output, _ = proc.communicate(timeout=500)
    assert proc.returncode == 0, output
    job = next(sweep.glob("0_*"))
    log = "".join(p.read_text() for p in sorted((sweep / ".submitit").glob("*/*_0_log.out")))
    assert "Stopped by SIGUSR2 at step" in log and "Requeued job" in log
    assert "submitit requeued this job after SIGUSR2: continuing from the last checkpoint" in log
    assert "Traceback" not in log + output
    assert read_status(job)["status"] == "completed"
    assert_losses_match(job, one_rank_reference, range(1, 21), 1e-5)  # each step once, as the uninterrupted run


# ---- 2 and 5. SIGUSR2 to torchrun, and a resume command that keeps the launcher and the global batch -------------


def test_sigusr2_to_torchrun_reaches_its_workers_once_and_the_printed_command_resumes_the_same_world(
        one_rank_reference, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "lmtrain", "train", *TWO_RANKS,
                             *SLOW_STEPS, f"hydra.run.dir={run}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **ONE_THREAD})
    read_until(proc, "Epoch 0, Batch 2,")
    workers = descendants(proc, "lmtrain")
    assert len(workers) == 2
    proc.send_signal(signal.SIGUSR2)  # torchrun does not handle it: it dies; its workers get their parent-death signal
    assert proc.wait(timeout=60) == -signal.SIGUSR2  # ended by the signal, as a shell reports with 140: no traceback
    psutil.wait_procs(workers, timeout=120)
    output = proc.stdout.read()  # to the end: the workers held the pipe until they exited
    assert not any(w.is_running() for w in workers)
    assert "Traceback" not in output
    assert output.count("SIGTERM received: stopping after this step") == 2  # once per worker
    assert output.count("Continue this run with:") == 1
    step = int(output.split("Stopped by SIGTERM at step ")[1].split()[0])
    command = shlex.split(output.split("Continue this run with:\n", 1)[1].splitlines()[0])
    assert command[:7] == ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "lmtrain", "train",
                           "trainer.resume=auto"]

    # as one process at half the global batch it would go on silently (tokens going backwards): refused, by number
    refused = run_cli("train", *TWO_RANKS, "trainer.resume=auto", f"hydra.run.dir={run}", env=ONE_THREAD)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert (f"step_{step:06d} was trained with a global batch of 8 sequences per step on 2 processes; this run's is "
            "4 (trainer.batch_size=4 x trainer.grad_accum_steps=1 x 1 process)") in refused.stdout
    assert "trainer.allow_batch_change=true" in refused.stdout

    # the printed command itself (later overrides win: back to the reference's 20 steps)
    result = subprocess.run([str(TORCHRUN), *command[1:], "trainer.max_steps=20", "trainer.eval_every=10"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, **ONE_THREAD})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Resuming from {run}/checkpoints/step_{step:06d} at step {step}" in result.stdout
    assert_losses_match(run, one_rank_reference, range(1, 21), 1e-5)


# ---- 3. every rank started with the same config and data ----------------------------------------------------


def start_ranks(args: list[list[str]], cwds: list[Path] | None = None) -> list[subprocess.Popen]:
    """Each rank started on its own, as torchrun on two nodes (or srun) would: torchrun's variables, one run dir."""
    port = free_port()
    return [subprocess.Popen([sys.executable, "-m", "lmtrain", "train", *a], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, cwd=cwds[rank] if cwds else None,
                             env={**os.environ, **ONE_THREAD, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                                  "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
            for rank, a in enumerate(args)]


def test_ranks_started_with_different_configs_or_data_stop_before_the_first_step_in_one_line(tmp_path):
    run = tmp_path / "run"
    ranks = start_ranks([[*TWO_RANKS, f"hydra.run.dir={run}"], [*TWO_RANKS, "optimizer.lr=1e-3", "trainer.max_steps=30",
                                                          f"hydra.run.dir={run}"]])
    outputs = [p.communicate(timeout=300)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [2, 2], outputs
    assert outputs[0].count("ERROR") == 1 and "ERROR" not in outputs[1]
    assert ("[rank 0] the ranks were started with different configs: optimizer.lr is 0.002 on rank 0 but 0.001 on "
            "rank 1; trainer.max_steps is 20 on rank 0 but 30 on rank 1.") in outputs[0]
    assert not (run / "metrics.jsonl").exists()

    # the same config, but the two "nodes" hold different files under the same relative name
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node, words in zip(nodes, ["alpha beta gamma delta", "one two three four five six"], strict=True):
        node.mkdir()
        (node / "corpus.txt").write_text("\n".join(f"{words} {i}" for i in range(300)) + "\n")
    data = ["data=text_files", "data.train_files=[corpus.txt]", f"hydra.run.dir={tmp_path / 'run2'}"]
    ranks = start_ranks([[*TWO_RANKS, *data], [*TWO_RANKS, *data]], cwds=nodes)
    outputs = [p.communicate(timeout=300)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [2, 2], outputs
    assert "[rank 0] the ranks were started with different data (the token caches' manifests and tokenizer): " \
           "data is" in outputs[0]
    assert "ERROR" not in outputs[1]


# ---- 4. diagnosis: a hung rank named with the timeout; SLURM without srun -----------------------------------


def test_a_rank_that_stops_answering_is_named_with_the_timeout_once(tmp_path):
    proc = start(*TWO_RANKS, *SLOW_STEPS, "trainer.nproc_per_node=2", "trainer.dist_timeout_s=5",
                 f"hydra.run.dir={tmp_path}")
    read_until(proc, "Epoch 0, Batch 2,")
    survivor, victim = descendants(proc, "spawn_main")
    victim.suspend()  # SIGSTOP: alive, but it answers nothing
    output = read_until(proc, "stopped answering")
    survivor.wait(timeout=60)
    time.sleep(2)  # the launcher polls its workers every 0.1 s: it has seen rank 0's exit, and stops the others
    victim.kill()  # which would give the stopped process 30 s to answer its SIGTERM first
    output += proc.communicate(timeout=120)[0]
    assert proc.returncode == 4, output  # lmtrain's exit status for a lost rank
    assert output.count("[rank 0] Rank 1 stopped answering: rank 0 waited trainer.dist_timeout_s=5 s for it") == 1
    assert "ERROR" not in output.replace("ERROR: [rank 0] Rank 1 stopped answering", "")  # nothing else, no blame
    assert "Traceback" not in output


def test_slurm_tasks_without_srun_are_refused_at_once(tmp_path):
    env = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[01-02]"}
    result = run_cli("train", *TWO_RANKS, f"hydra.run.dir={tmp_path / 'run'}", env=env, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "this SLURM job has 8 tasks (SLURM_NTASKS=8) but srun did not start this process" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


# ---- 5. workers die with their launcher; the run folder stays locked until the last one exits ----------------


def test_sigkill_of_the_launcher_stops_its_workers_which_save_and_keep_the_folder_locked(tmp_path):
    run = tmp_path / "run"
    proc = start(*TWO_RANKS, *SLOW_STEPS, "trainer.nproc_per_node=2", f"hydra.run.dir={run}")
    read_until(proc, "Epoch 0, Batch 2,")
    workers = descendants(proc, "spawn_main")
    proc.kill()
    proc.wait()

    def locked() -> bool:  # what a second `lmtrain train` in this folder would find
        with open(run / ".lmtrain.lock") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    locked_while_alive = []
    while any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers):
        locked_while_alive.append(locked())
        time.sleep(0.2)
    assert locked_while_alive and all(locked_while_alive)
    # free once the last worker has gone (the kernel may close an exiting process's files a moment later)
    wait_for(lambda: not locked(), timeout=30, what="the lock to be released")
    output = proc.stdout.read()
    assert output.count("SIGTERM received: stopping after this step") == 2
    steps = [int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*")]
    assert len(steps) == 1 and max(step_losses(run)) == steps[0]  # both stopped at one step and saved it


# ---- 7. Muon under FSDP2 saves and resumes; a damaged sharded checkpoint falls back --------------------------


def test_muon_under_fsdp2_resumes_exactly_and_a_truncated_shard_falls_back_to_the_checkpoint_before(tmp_path):
    muon = [*TWO_RANKS, "optimizer=muon", "trainer.strategy=fsdp", "trainer.nproc_per_node=2", "trainer.save_every=5",
            "trainer.max_steps=10", "trainer.keep_last=0", f"hydra.run.dir={tmp_path}"]
    result = run_cli("train", *muon, env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    first = step_losses(tmp_path)
    assert list(first) == list(range(1, 11))
    shard = sorted((tmp_path / "checkpoints/step_000010/shards").glob("*.safetensors"))[1]
    os.truncate(shard, shard.stat().st_size // 2)

    result = run_cli("train", *muon, "trainer.resume=auto", env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Cannot resume from step_000010: {shard} is truncated or corrupt" in result.stdout
    assert "Falling back to step_000005, the newest checkpoint that reads whole" in result.stdout
    assert f"Resuming from {tmp_path}/checkpoints/step_000005 at step 5" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert step_losses(tmp_path) == first  # Muon's and AdamW's state came back whole
