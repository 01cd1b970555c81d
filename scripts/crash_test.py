"""Kill `lmtrain train` with SIGKILL at random moments, resume after each kill, and check that the run
ends exactly where an uninterrupted one does.

    python scripts/crash_test.py                 # 20 kills (about 4 minutes on 2 busy CPU cores)
    python scripts/crash_test.py --kills 2 --steps 40

A tiny model trains on the built-in corpus, saving every 3 steps. Kills cycle through three kinds of
moment: inside a save (when a temporary checkpoint folder appears, plus 0-3 ms); during start-up (a
random time up to the uninterrupted run's start-up time: while importing, loading data or resuming);
during training (after a random number of the attempt's steps, drawn so the run outlasts the kills, plus
0-30 ms, so anywhere in a step). After each kill the newest checkpoint must read whole; then
`trainer.resume=auto` continues. At the end the final weights and every logged loss must equal the
uninterrupted run's, bit for bit.

Two more cases follow (skip them with --no-extra-cases):
- a full disk: the run folder on a 1 MB tmpfs (needs root, for `mount`), so a save fails mid-run. The
  run must stop with exit status 2 and one line naming the path and the fix, leave its newest checkpoint
  whole and no half-written folder; with the disk enlarged, `trainer.resume=auto` must end exactly where
  the uninterrupted run did.
- two processes, one folder: a second `trainer.resume=auto` started while the first trains must exit 2
  at once, naming the first one's PID; the first goes on undisturbed (stopped by SIGTERM once the
  second has been refused), with each step logged once.
Exits 0 when all of that holds.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmtrain.errors import CheckpointError
from lmtrain.runs.checkpoint import read_json
from lmtrain.runs.metrics import read_metrics
from lmtrain.training.state import TrainingCheckpoint

SETTINGS = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.block_size=16",
            "model.dropout=0.1", "data.max_documents=150", "tokenizer.vocab_size=300", "trainer.batch_size=8",
            "trainer.eval_batches=2", "trainer.eval_every=10", "trainer.log_every=1", "trainer.progress=false",
            "trainer.save_every=3", "trainer.keep_last=2"]
SCRATCH = re.compile(r"\..+\.(tmp|old|trash)\d+")
KINDS = ["inside a save", "during start-up", "during training"]


def train_command(run_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "lmtrain", "train", *SETTINGS, f"trainer.max_steps={steps}",
            "trainer.resume=auto", f"hydra.run.dir={run_dir}"]


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)


def unfinished(root: Path) -> set[str]:
    """What cut-short saves leave: temporary folders and files, and step folders newer than latest.json."""
    if not root.is_dir():
        return set()
    names = os.listdir(root)
    newest = read_json(root / "latest.json")["step"] if "latest.json" in names else -1
    return {n for n in names if SCRATCH.fullmatch(n) or n.startswith("step_") and int(n[5:]) > newest}


def newest_checkpoint_reads(root: Path) -> bool | None:
    """Whether the checkpoint latest.json names reads whole; None when nothing was saved yet."""
    if not (root / "latest.json").exists():
        return None
    try:
        TrainingCheckpoint.read(root / read_json(root / "latest.json")["folder"])
    except CheckpointError as e:
        print(f"    checkpoint unreadable: {e}")
        return False
    return True


def losses(run_dir: Path) -> list[tuple]:
    """Every logged loss, in order, without the timing fields (which differ from run to run)."""
    return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("epoch_avg_loss"))
            for r in read_metrics(run_dir / "metrics.jsonl")]


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def wait_for_moment(kind: str, proc: subprocess.Popen, rng: random.Random, root: Path, log_path: Path,
                    startup: float, max_steps: int) -> None:
    """Block until a random moment of the given kind in the attempt's life."""
    if kind == "inside a save":
        before = unfinished(root)  # left by the previous kill, until this attempt tidies them
        wait_until(lambda: bool(unfinished(root) - before), proc)
        time.sleep(rng.uniform(0, 0.003))
    elif kind == "during start-up":
        time.sleep(rng.uniform(0, startup))
    else:
        steps = rng.randint(1, max_steps)
        wait_until(lambda: log_path.read_text().count("Batch ") >= steps, proc)
        time.sleep(rng.uniform(0, 0.03))


def start_up_time(command: list[str], env: dict, log_path: Path) -> tuple[int, float]:
    """Run to the end; its exit status, and the seconds from its start to its first logged step."""
    started = time.monotonic()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        wait_until(lambda: "Batch " in log_path.read_text(), proc)
        first_step = time.monotonic() - started
        return proc.wait(), first_step


def check_full_disk(work: Path, steps: int, env: dict) -> bool:
    """A save that meets a full disk stops the run cleanly and resumably."""
    mount_point = work / "small_disk"
    mount_point.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)]).returncode != 0:
        print("full disk: SKIPPED (mounting a tmpfs needs root)")
        return True
    try:
        run_dir, root = mount_point / "run", mount_point / "run" / "checkpoints"
        full = subprocess.run(train_command(run_dir, steps), env=env, capture_output=True, text=True)
        errors = [line for line in (full.stdout + full.stderr).splitlines() if "ERROR" in line]
        print(f"full disk: exit status {full.returncode}; error lines: {errors}")
        one_line = (full.returncode == 2 and len(errors) == 1 and "No space left on device" in errors[0]
                    and str(mount_point) in errors[0] and "Traceback" not in full.stderr)
        whole = newest_checkpoint_reads(root) is True
        leftovers = unfinished(root)
        print(f"  newest checkpoint reads whole: {'yes' if whole else 'NO'}; half-written folders left: "
              f"{sorted(leftovers) or 'none'}")
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount_point)], check=True)
        resumed = subprocess.run(train_command(run_dir, steps), env=env, capture_output=True, text=True)
        same = resumed.returncode == 0 and same_weights(work / "reference/checkpoints/final", root / "final") \
            and losses(work / "reference") == losses(run_dir)
        print(f"  after freeing space, resume completes with the uninterrupted run's weights and losses: "
              f"{'yes' if same else 'NO'}")
        if resumed.returncode != 0:
            print(resumed.stdout[-2000:], resumed.stderr[-2000:])
        return one_line and whole and not leftovers and same
    finally:
        subprocess.run(["umount", str(mount_point)])


def check_two_processes(work: Path, env: dict) -> bool:
    """A second process in a folder where one trains is refused at once; the first goes on undisturbed."""
    run_dir = work / "shared_folder"
    command = train_command(run_dir, 1_000_000)  # still training whenever the second one starts
    with open(work / "first.log", "w") as log_file:
        first = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        wait_until(lambda: "Batch " in (work / "first.log").read_text(), first)
        second = subprocess.run(command, env=env, capture_output=True, text=True)
        still_training = first.poll() is None
        first.send_signal(signal.SIGTERM)  # then a clean stop: it saves, and exits 143
        first_rc = first.wait()
    text = second.stdout + second.stderr
    refused = second.returncode == 2 and f"PID {first.pid}" in text and "Traceback" not in text
    print(f"two processes: the second exits {second.returncode}"
          f"{', naming the first one' if f'PID {first.pid}' in text else ''}; the first "
          f"{'was still training, then' if still_training else 'had ended before:'} exits {first_rc} on SIGTERM")
    logged = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    once = bool(logged) and logged == sorted(set(logged))
    print(f"  each step logged once: {'yes' if once else 'NO'} ({len(logged)} steps)")
    return refused and still_training and first_rc == 128 + signal.SIGTERM and once


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps of the run")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--workdir", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--no-extra-cases", action="store_true", help="only the kills: no full disk, no two processes")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lmtrain-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model gains nothing from threads on a shared CPU

    print(f"Runs in {work}; {args.steps} steps, saving every 3")
    start = time.monotonic()
    rc, startup = start_up_time(train_command(work / "reference", args.steps), env, work / "reference.log")
    if rc != 0:
        print((work / "reference.log").read_text())
        return 1
    print(f"Uninterrupted run: {time.monotonic() - start:.1f} s, {startup:.1f} s of it before the first step")

    crashed, root = work / "crashed", work / "crashed" / "checkpoints"
    counts = {kind: 0 for kind in KINDS}
    kills = inside_save = whole = resumed = 0
    attempt = 0
    while True:
        attempt += 1
        log_path = work / f"attempt_{attempt:02d}.log"
        kind = KINDS[(attempt - 1) % len(KINDS)] if kills < args.kills else None
        done = read_json(root / "latest.json")["step"] if (root / "latest.json").exists() else 0
        max_steps = max(1, 2 * (args.steps - done) // (args.kills - kills + 1))  # leave steps for the later kills
        before = unfinished(root)
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(train_command(crashed, args.steps), env=env, stdout=log_file,
                                    stderr=subprocess.STDOUT)
            if kind is not None:
                wait_for_moment(kind, proc, rng, root, log_path, startup, max_steps)
                if proc.poll() is None:
                    proc.kill()
            rc = proc.wait()
        text = log_path.read_text()
        if re.search(r"Resuming from \S+ at step \d+", text):
            resumed += 1
        if rc == -9:
            kills += 1
            counts[kind] += 1
            landed_in_save = bool(unfinished(root) - before)
            inside_save += landed_in_save
            reads = newest_checkpoint_reads(root)
            whole += reads is not False
            latest = f"step {read_json(root / 'latest.json')['step']}" if (root / "latest.json").exists() else "none"
            print(f"kill {kills:2d} ({kind}): latest checkpoint: {latest}"
                  f"{', inside a save' if landed_in_save else ''}{'' if reads is not False else ', UNREADABLE'}")
            continue
        if rc != 0:
            print(f"attempt {attempt} failed with exit status {rc}:\n{text[-3000:]}")
            return 1
        if kills < args.kills:
            print(f"The run completed after {kills} kills, before the last could land: use more --steps")
        break  # the run completed

    weights_ok = same_weights(work / "reference/checkpoints/final", crashed / "checkpoints/final")
    ref_losses, crash_losses = losses(work / "reference"), losses(crashed)
    losses_ok = ref_losses == crash_losses
    print(f"\nkills: {kills} ({', '.join(f'{n} {k}' for k, n in counts.items())}); "
          f"{inside_save} landed inside a save, by what they left on disk")
    print(f"resumes: {attempt - 1} started after a kill, {resumed} logged 'Resuming from' a checkpoint, "
          f"none failed; newest checkpoint read whole after {whole} of {kills} kills")
    print(f"final weights equal the uninterrupted run's: {'yes' if weights_ok else 'NO'} (bit for bit)")
    print(f"logged losses equal: {'yes' if losses_ok else 'NO'} ({len(ref_losses)} records vs {len(crash_losses)})")
    print(f"total time: {time.monotonic() - start:.0f} s")
    ok = weights_ok and losses_ok and whole == kills and kills == args.kills
    if not args.no_extra_cases:
        print()
        ok = check_full_disk(work, args.steps, env) and ok
        ok = check_two_processes(work, env) and ok
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
