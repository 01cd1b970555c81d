"""How fast lmtrain answers when it has nothing to train: --help, a config error, a shell completion (TAB).

    python scripts/bench_startup.py                          # each case 5 times: median and best wall time
    python scripts/bench_startup.py --baseline OLD_CHECKOUT     # and the same cases on another source tree

Each case runs `python -m lmtrain ...` in a fresh process in an empty scratch folder, as a user's shell would,
and a second time with `-X importtime` to say whether it imported torch (the import that costs seconds).
--baseline names the root of another lmtrain checkout (`git archive COMMIT | tar -x -C DIR`, say): its lmtrain/
and configs/ are copied into a scratch folder laid out as an install (configs/ as lmtrain/configs) and put first
on PYTHONPATH, and each case runs on both, alternating, so a machine whose load changes affects both alike. On a
busy machine the medians grow; the best time is the closest to a quiet machine's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = [  # (name, arguments, extra environment)
    ("lmtrain --help", ["--help"], {}),
    ("lmtrain train --help", ["train", "--help"], {}),
    ("a mistyped value: optimizer.lr=abc", ["train", "optimizer.lr=abc"], {}),
    ("a cross-field error: d_model=100 n_heads=12", ["train", "model.d_model=100", "model.n_heads=12"], {}),
    ("completion: lmtrain train trainer.max_<TAB>", ["train", "-sc", "query=bash"],
     {"COMP_LINE": "lmtrain train trainer.max_", "COMP_POINT": "26"}),
]


def installed_copy(checkout: Path, into: Path) -> dict:
    """The environment that imports lmtrain from a copy of `checkout`, laid out as an install."""
    shutil.copytree(checkout / "lmtrain", into / "lmtrain", ignore=shutil.ignore_patterns("__pycache__", "configs"))
    shutil.copytree(checkout / "configs", into / "lmtrain" / "configs")
    return {"PYTHONPATH": str(into)}


def run(args: list[str], env: dict, cwd: str, importtime: bool = False) -> tuple[float, int, str]:
    argv = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "lmtrain", *args]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True)
    return time.perf_counter() - start, done.returncode, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout's root, timed side by side")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as scratch:
        trees = {"this checkout": {}}
        if args.baseline is not None:
            trees["baseline"] = installed_copy(args.baseline.resolve(), Path(scratch) / "baseline")
        work = Path(scratch) / "work"
        work.mkdir()
        keys = [(tree, name) for name, _, _ in CASES for tree in trees]
        times: dict[tuple, list[float]] = {key: [] for key in keys}
        status, torch = {}, {}
        cases = {name: (argv, env) for name, argv, env in CASES}
        for tree, name in keys:
            argv, env = cases[name]
            _, _, stderr = run(argv, {**env, **trees[tree]}, str(work), importtime=True)
            torch[tree, name] = any(line.split("|")[-1].strip() == "torch" for line in stderr.splitlines())
        for _ in range(args.runs):
            for tree, name in keys:
                argv, env = cases[name]
                seconds, status[tree, name], _ = run(argv, {**env, **trees[tree]}, str(work))
                times[tree, name].append(seconds)
    print(f"{'case':<46}{'tree':<15}{'median s':>9}{'best s':>8}{'exit':>6}  torch   ({args.runs} runs, load average "
          f"{os.getloadavg()[0]:.1f})")
    for tree, name in keys:
        print(f"{name:<46}{tree:<15}{statistics.median(times[tree, name]):>9.2f}{min(times[tree, name]):>8.2f}"
              f"{status[tree, name]:>6}  {'yes' if torch[tree, name] else 'no'}")


if __name__ == "__main__":
    main()
