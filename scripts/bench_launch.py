"""Seconds from the command to the first training step, and to the exit: `lmtrain train trainer.nproc_per_node=N`
against `torchrun --standalone --nproc_per_node=N -m lmtrain train`, the same short run, in alternating rounds.

    python scripts/bench_launch.py                          # 2 processes, 3 rounds
    python scripts/bench_launch.py --procs 4 --rounds 5
    python scripts/bench_launch.py --source /tmp/lmtrain-main . # also each launcher on another source tree

Each round runs every case once, in turn, so that a machine whose load drifts treats them alike; the table
shows the median and the best round of each case. --source runs lmtrain from those source trees (their
folders go first on PYTHONPATH), to compare a change with the code before it in one session. The token
cache and the measured precision figures are warmed by a first run that does not count. On a shared machine
wrap it in `flock /tmp/lmtrain-bench.lock`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TORCHRUN = Path(sys.executable).parent / "torchrun"
RUN = ["trainer.max_steps=3", "trainer.log_every=1", "trainer.eval_every=100", "trainer.save_every=0",
       "trainer.sample_every=0", "trainer.progress=false", "data.max_documents=300"]


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """Seconds to the line of the first training step, and to the exit."""
    start, first = time.perf_counter(), None
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if first is None and "Epoch 0, Batch 1," in line:
            first = time.perf_counter() - start
    if proc.wait() != 0 or first is None:
        sys.exit(f"{' '.join(command)} failed:\n{''.join(lines[-30:])}")
    return first, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--source", nargs="*", default=[], help="source trees to run lmtrain from (default: installed)")
    parser.add_argument("overrides", nargs="*", help="more `lmtrain train` overrides (a model, say)")
    args = parser.parse_args()
    sources = args.source or [""]
    workdir = Path(tempfile.mkdtemp(prefix="lmtrain-startup-"))
    cases = [(source, launcher) for source in sources for launcher in ("nproc_per_node", "torchrun")]
    times: dict[tuple[str, str], list[tuple[float, float]]] = {case: [] for case in cases}
    for r in range(args.rounds + 1):  # round 0 warms the caches
        for source, launcher in cases:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)}
            run = [*RUN, *args.overrides, f"hydra.run.dir={workdir}/{len(os.listdir(workdir))}"]
            ours = [sys.executable, "-m", "lmtrain", "train", *run, f"trainer.nproc_per_node={args.procs}"]
            theirs = [str(TORCHRUN), "--standalone", f"--nproc_per_node={args.procs}", "-m", "lmtrain", "train", *run]
            command = ours if launcher == "nproc_per_node" else theirs
            result = timed(command, env)
            if r > 0:
                times[(source, launcher)].append(result)
            print(f"round {r}: {source or 'installed'} {launcher}: first step {result[0]:.1f} s, "
                  f"exit {result[1]:.1f} s", flush=True)
    print(f"\n{args.procs} processes, {args.rounds} rounds (median / best, seconds)")
    print("| source | launcher | to the first step | to the exit |\n|---|---|---|---|")
    for (source, launcher), values in times.items():
        first, total = [v[0] for v in values], [v[1] for v in values]
        print(f"| {source or 'installed'} | {launcher} | {statistics.median(first):.1f} / {min(first):.1f} | "
              f"{statistics.median(total):.1f} / {min(total):.1f} |")


if __name__ == "__main__":
    main()
