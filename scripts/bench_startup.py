"""How fast lmtrain answers when it has nothing to train: --help, a config error, a shell completion (TAB).

    python scripts/bench_startup.py              # each case 5 times: median and best wall time, exit status
    python scripts/bench_startup.py --runs 11

Each case runs `python -m lmtrain ...` in a fresh process in an empty scratch folder, as a user's shell would,
and a second time with `-X importtime` to say whether it imported torch (the import that costs seconds). The
cases alternate, so a machine whose load changes affects them alike. On a busy machine the medians grow; the
best time is the closest to a quiet machine's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CASES = [  # (name, arguments, extra environment)
    ("lmtrain --help", ["--help"], {}),
    ("lmtrain train --help", ["train", "--help"], {}),
    ("a mistyped value: optimizer.lr=abc", ["train", "optimizer.lr=abc"], {}),
    ("a cross-field error: d_model=100 n_heads=12", ["train", "model.d_model=100", "model.n_heads=12"], {}),
    ("completion: lmtrain train trainer.max_<TAB>", ["train", "-sc", "query=bash"],
     {"COMP_LINE": "lmtrain train trainer.max_", "COMP_POINT": "26"}),
]


def run(args: list[str], env: dict, cwd: str, importtime: bool = False) -> tuple[float, int, str]:
    argv = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "lmtrain", *args]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True)
    return time.perf_counter() - start, done.returncode, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name, _, _ in CASES}
    status, torch = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as scratch:
        for name, argv, env in CASES:
            _, _, stderr = run(argv, env, scratch, importtime=True)
            torch[name] = any(line.rstrip().endswith("| torch") for line in stderr.splitlines())
        for _ in range(args.runs):
            for name, argv, env in CASES:
                seconds, status[name], _ = run(argv, env, scratch)
                times[name].append(seconds)
    print(f"{'case':<46}{'median s':>9}{'best s':>8}{'exit':>6}  imports torch   ({args.runs} runs, "
          f"load average {os.getloadavg()[0]:.1f})")
    for name, _, _ in CASES:
        print(f"{name:<46}{statistics.median(times[name]):>9.2f}{min(times[name]):>8.2f}{status[name]:>6}  "
              f"{'yes' if torch[name] else 'no'}")


if __name__ == "__main__":
    main()
