"""Kill `lmtrain train` with SIGKILL at random moments, resume after each kill, and check that the run
ends exactly where an uninterrupted one does.

    python scripts/crash_test.py                 # 20 kills (about 4 minutes on 2 busy CPU cores)
    python scripts/crash_test.py --kills 2 --steps 40

A tiny model trains on the built-in corpus, saving every few steps. Kills cycle through three kinds of
moment: inside a save (the moment a temporary checkpoint folder appears, plus 0-3 ms), during training
(0-1.5 s after the attempt's first step), and any time after the start (0-8 s: often during start-up or
while resuming). After each kill the newest checkpoint must read whole; then `trainer.resume=auto`
continues. At the end the final weights and every logged loss must equal the uninterrupted run's, bit
for bit. Exits 0 when all of that holds.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmtrain.checkpoint import read_json
from lmtrain.errors import CheckpointError
from lmtrain.metrics import read_metrics
from lmtrain.train_state import TrainingCheckpoint

SETTINGS = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.block_size=16",
            "model.dropout=0.1", "data.max_documents=150", "tokenizer.vocab_size=300", "trainer.batch_size=8",
            "trainer.eval_batches=2", "trainer.eval_every=10", "trainer.log_every=1", "trainer.progress=false",
            "trainer.save_every=3", "trainer.keep_last=2"]
SCRATCH = re.compile(r"\..+\.(tmp|old|trash)\d+")
KINDS = ["inside a save", "any time", "during training"]


def train_command(run_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "lmtrain", "train", *SETTINGS, f"trainer.max_steps={steps}",
            "trainer.resume=auto", f"hydra.run.dir={run_dir}"]


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)


def scratch(root: Path) -> list[str]:
    return [n for n in os.listdir(root) if SCRATCH.fullmatch(n)] if root.is_dir() else []


def save_under_way(root: Path) -> bool:
    """A save was cut short: a temporary folder or file, or a step folder newer than latest.json."""
    if scratch(root):
        return True
    if not (root / "latest.json").exists():
        return any(p.name.startswith("step_") for p in root.iterdir()) if root.is_dir() else False
    newest = read_json(root / "latest.json")["step"]
    return any(int(p.name[5:]) > newest for p in root.iterdir() if p.name.startswith("step_"))


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


def run_attempt(command: list[str], env: dict, log_path: Path, root: Path, kind: str | None,
                rng: random.Random) -> int:
    """Start training; SIGKILL it at a moment of the given kind (None: let it finish); its exit status."""
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        if kind == "inside a save":
            wait_until(lambda: bool(scratch(root)), proc)
            time.sleep(rng.uniform(0, 0.003))
        elif kind == "during training":
            wait_until(lambda: "Batch " in log_path.read_text(), proc)
            time.sleep(rng.uniform(0, 1.5))
        elif kind == "any time":
            time.sleep(rng.uniform(0, 8.0))
        if kind is not None and proc.poll() is None:
            proc.kill()
        return proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps of the run")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--workdir", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lmtrain-crash-"))
    rng = random.Random(args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model gains nothing from threads on a shared CPU

    print(f"Runs in {work}; {args.steps} steps, saving every 3")
    start = time.monotonic()
    reference = subprocess.run(train_command(work / "reference", args.steps), env=env, capture_output=True, text=True)
    if reference.returncode != 0:
        print(reference.stdout + reference.stderr)
        return 1
    print(f"Uninterrupted run: {time.monotonic() - start:.1f} s")

    crashed, root = work / "crashed", work / "crashed" / "checkpoints"
    counts = {kind: 0 for kind in KINDS}
    kills = inside_save = whole = resumed = failed = 0
    attempt = 0
    while True:
        attempt += 1
        log_path = work / f"attempt_{attempt:02d}.log"
        kind = KINDS[(attempt - 1) % len(KINDS)] if kills < args.kills else None
        rc = run_attempt(train_command(crashed, args.steps), env, log_path, root, kind, rng)
        text = log_path.read_text()
        if re.search(r"Resuming from \S+ at step \d+", text):
            resumed += 1
        if rc == -9:
            kills += 1
            counts[kind] += 1
            landed_in_save = save_under_way(root)
            inside_save += landed_in_save
            reads = newest_checkpoint_reads(root)
            whole += reads is not False
            latest = f"step {read_json(root / 'latest.json')['step']}" if (root / "latest.json").exists() else "none"
            print(f"kill {kills:2d} ({kind}): latest checkpoint: {latest}"
                  f"{', inside a save' if landed_in_save else ''}{'' if reads is not False else ', UNREADABLE'}")
            continue
        if rc != 0:
            failed += 1
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
          f"{failed} failed; newest checkpoint read whole after {whole} of {kills} kills")
    print(f"final weights equal the uninterrupted run's: {'yes' if weights_ok else 'NO'} (bit for bit)")
    print(f"logged losses equal: {'yes' if losses_ok else 'NO'} ({len(ref_losses)} records vs {len(crash_losses)})")
    print(f"total time: {time.monotonic() - start:.0f} s")
    ok = weights_ok and losses_ok and whole == kills and kills == args.kills
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
