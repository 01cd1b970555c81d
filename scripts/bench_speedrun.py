"""Training time to a validation loss: nanoGPT's shakespeare_char recipe against lmtrain's speedrun.

    flock /tmp/lmtrain-bench.lock python scripts/bench_speedrun.py --data tinyshakespeare.txt --rounds 3
    flock /tmp/lmtrain-bench.lock python scripts/bench_speedrun.py --data tinyshakespeare.txt --precision fp32

Each round trains `experiment=shakespeare_char` and `experiment=shakespeare_char_speedrun` once each, with
`lmtrain train` in a fresh process, one after the other on the same machine; the order alternates from round
to round, so neither always runs first. From each run's metrics.jsonl it reads the first validation record
at or below --target (nanoGPT's CPU result, 1.886 by default) and reports:
- training s: seconds from the first step to that evaluation, evaluation time excluded. The trainer writes a
  step record just before each evaluation (log_every is set to eval_every here) and the evaluation record
  just after, so each evaluation's time is the gap between the two. A best-checkpoint save after an improved
  evaluation still counts as training time (tens of milliseconds each; more evaluations, more of it).
- wall s: the evaluation record's elapsed_s, evaluations included.
Both runs evaluate every --baseline-eval-every / --speedrun-eval-every steps (finer than the recipes' own
250 for nanoGPT's, so its time to the target is not rounded up by a coarse grid). A run that never reaches
the target shows its training time to its last evaluation, as a lower bound ("> N s"), and a ratio against
it is an upper bound ("<"). The ratio is speedrun / nanoGPT, per round. The report names the precision each
run used (from its log), the CPU and its instruction set (avx2, avx512f, avx512_bf16, amx).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from lmtrain.runs.metrics import read_metrics
from lmtrain.training.mfu import cpu_model
from lmtrain.training.precision import cpu_flags

RECIPES = {"nanogpt": "shakespeare_char", "speedrun": "shakespeare_char_speedrun"}
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description() -> dict:
    """The CPU's model name and which of ISA_FLAGS its flags list (what lscpu shows as Flags)."""
    flags = cpu_flags()
    return {"model": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "isa": {flag: flag in flags for flag in ISA_FLAGS}}


def time_to_target(records: list[dict], target: float) -> dict:
    """From one run's metrics.jsonl records: the first evaluation at or below `target`, its step, the training
    seconds to it (evaluations excluded) and the wall seconds (included); or, when no evaluation got there,
    the same figures for the last evaluation with reached=False."""
    eval_seconds, last_step_time, found = 0.0, {}, None
    for record in records:
        if "loss" in record:
            last_step_time[record["step"]] = record["elapsed_s"]
        if "val_loss" not in record:
            continue
        started = last_step_time.get(record["step"])
        if started is None:
            raise SystemExit(f"no step record just before the evaluation at step {record['step']}: log_every must "
                             "divide eval_every")
        eval_seconds += record["elapsed_s"] - started
        found = {"step": record["step"], "val_loss": record["val_loss"], "wall_s": record["elapsed_s"],
                 "train_s": record["elapsed_s"] - eval_seconds, "reached": record["val_loss"] <= target}
        if found["reached"]:
            break
    if found is None:
        raise SystemExit("the run logged no evaluation")
    return found


def train(recipe: str, data: Path, run_dir: Path, eval_every: int, extra: list[str]) -> tuple[list[dict], str]:
    """One `lmtrain train` run; returns its metrics records and the precision its log names."""
    overrides = [f"experiment={recipe}", f"data.train_files=[{data}]", f"trainer.eval_every={eval_every}",
                 f"trainer.log_every={eval_every}", "trainer.save_every=0", "trainer.progress=false",
                 f"hydra.run.dir={run_dir}", *extra]
    result = subprocess.run([sys.executable, "-m", "lmtrain", "train", *overrides], capture_output=True, text=True)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"lmtrain train {' '.join(overrides)} failed:\n{output[-3000:]}")
    match = re.search(r"Precision (\w+): ", output)  # the trainer's "Precision bf16: <why auto chose it>" line
    return read_metrics(run_dir / "metrics.jsonl"), match[1].strip() if match else "?"


def seconds(r: dict) -> str:
    return f"{r['train_s']:.1f}" if r["reached"] else f"> {r['train_s']:.1f}"


def report_table(rows: list[dict], target: float) -> Table:
    table = Table(title=f"Training time to validation loss <= {target}", title_justify="left")
    for col in ["round", "recipe", "precision", "step", "val loss", "training s", "wall s", "ratio"]:
        table.add_column(col, justify="left" if col in ("recipe", "precision") else "right")
    for r in rows:
        table.add_row(str(r["round"]), r["recipe"], r["precision"], str(r["step"]), f"{r['val_loss']:.4f}",
                      seconds(r), f"{r['wall_s']:.1f}", r.get("ratio_text", ""))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="tiny Shakespeare (karpathy/char-rnn's input.txt)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of one run per recipe")
    parser.add_argument("--target", type=float, default=1.886, help="validation loss to reach")
    parser.add_argument("--precision", choices=["recipe", "auto", "fp32", "bf16"], default="recipe",
                        help="trainer.precision for both runs; recipe: each recipe's own")
    parser.add_argument("--baseline-eval-every", type=int, default=50, help="nanoGPT recipe's steps between evals")
    parser.add_argument("--speedrun-eval-every", type=int, default=None,
                        help="speedrun's steps between evals (default: the recipe's own)")
    parser.add_argument("--override", action="append", default=[],
                        help="an extra `lmtrain train` override for both runs (repeatable), e.g. trainer.max_steps=20")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--keep", type=Path, help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"--data {args.data}: no such file")
    data = args.data.resolve()
    extra = ([] if args.precision == "recipe" else [f"trainer.precision={args.precision}"]) + args.override
    speedrun_eval = args.speedrun_eval_every or recipe_eval_every(RECIPES["speedrun"])
    every = {"nanogpt": args.baseline_eval_every, "speedrun": speedrun_eval}

    console = Console(width=None if sys.stdout.isatty() else 120)
    cpu = cpu_description()
    console.print(f"CPU: {cpu['model']}, {cpu['cores']} cores; " + ", ".join(
        f"{flag} {'yes' if has else 'no'}" for flag, has in cpu["isa"].items()) +
        f"; torch CPU capability {cpu['torch_cpu_capability']}, {cpu['torch_threads']} threads")
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_speedrun_"))
    rows = []
    try:
        for round_ in range(1, args.rounds + 1):
            order = ["nanogpt", "speedrun"] if round_ % 2 else ["speedrun", "nanogpt"]
            results = {}
            for name in order:
                records, precision = train(RECIPES[name], data, root / f"{name}_{round_}", every[name], extra)
                results[name] = {"round": round_, "recipe": name, "precision": precision,
                                 **time_to_target(records, args.target)}
                r = results[name]
                console.log(f"round {round_}, {name} ({precision}): val {r['val_loss']:.4f} at step {r['step']}, "
                            f"training {seconds(r)} s, wall {r['wall_s']:.1f} s")
            fast, slow = results["speedrun"], results["nanogpt"]
            if fast["reached"]:
                fast["ratio"] = fast["train_s"] / slow["train_s"]
                fast["ratio_text"] = f"{'' if slow['reached'] else '< '}{fast['ratio']:.3f}"
            rows += [results["nanogpt"], results["speedrun"]]
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    console.print(report_table(rows, args.target))
    ratios = [r["ratio"] for r in rows if "ratio" in r]
    if ratios:
        console.print(f"speedrun / nanoGPT training time: median {statistics.median(ratios):.3f}, "
                      f"worst {max(ratios):.3f} over {len(ratios)} rounds")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "target": args.target, "eval_every": every,
                                         "precision_override": args.precision, "runs": rows}, indent=2) + "\n")
        console.print(f"wrote {args.json}")


def recipe_eval_every(recipe: str) -> int:
    """The recipe's own trainer.eval_every, from its YAML in configs/experiment/."""
    path = Path(__file__).resolve().parents[1] / "configs" / "experiment" / f"{recipe}.yaml"
    return int(OmegaConf.load(path).trainer.eval_every)


if __name__ == "__main__":
    main()
