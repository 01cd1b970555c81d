"""Training time to a validation loss: nanoGPT's shakespeare_char recipe against lmtrain's speedrun.

    flock /tmp/lmtrain-bench.lock python scripts/bench_speedrun.py --data tinyshakespeare.txt --rounds 3
    flock /tmp/lmtrain-bench.lock python scripts/bench_speedrun.py --data tinyshakespeare.txt --precision fp32

Each round trains `experiment=shakespeare_char` and `experiment=shakespeare_char_speedrun` once each, with
`lmtrain train` in a fresh process, one after the other on the same machine; the order alternates from round
to round, so neither always runs first. From each run's metrics.jsonl it reads the first validation record
at or below --target (nanoGPT's CPU result, 1.886 by default) and reports:
- training s: seconds from the first step to that evaluation, evaluation time excluded. The trainer writes a
  step record just before each evaluation (log_every is set to eval_every here) and the evaluation record
  just after (a screening pass's record first, with trainer.eval_screen_batches), so each evaluation's time
  is the gap between them. A best-checkpoint save after an improved evaluation still counts as training time
  (tens of milliseconds each; more evaluations, more of it).
- wall s: the evaluation record's elapsed_s, evaluations included: the time from the first step.
- process s: the `lmtrain train` process's whole life: start-up, data, a compile, the final save included.
- passes: whole validation passes up to the target (and screening passes, which decide only when to run one).
Whether the target is reached is decided on whole passes only: the speedrun recipe screens each evaluation
on an eighth of the split (trainer.eval_screen_batches) and scores the whole split once that reads within
0.05 of the target; its time to the target stays the first whole pass at or below it.
Both runs evaluate every --baseline-eval-every / --speedrun-eval-every steps (finer than the recipes' own
250 for nanoGPT's, so its time to the target is not rounded up by a coarse grid). A run that never reaches
the target shows its training time to its last evaluation, as a lower bound ("> N s"), and a ratio against
it is an upper bound ("<"). The ratios are speedrun / nanoGPT's recipe, per round, of training and of wall
time; each speedrun's times are also given as shares of nanoGPT's own 86 s on this machine kind. The report
names the precision and compilation each run used (from its log), the load average when it ended, the CPU
and its instruction set (avx2, avx512f, avx512_bf16, amx).
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
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from lmtrain.runs.metrics import read_metrics
from lmtrain.training.mfu import cpu_model
from lmtrain.training.precision import cpu_flags

RECIPES = {"nanogpt": "shakespeare_char", "speedrun": "shakespeare_char_speedrun"}
# nanoGPT's own code on this machine kind (2-core AMD EPYC, torch 2.13, fp32): val loss 1.886 after about 86 s
# (/work/shared/data/README.md; the figure a speedrun's times are also divided by)
NANOGPT_REFERENCE_S = 86.0
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description() -> dict:
    """The CPU's model name and which of ISA_FLAGS its flags list (what lscpu shows as Flags)."""
    flags = cpu_flags()
    return {"model": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "isa": {flag: flag in flags for flag in ISA_FLAGS}}


def time_to_target(records: list[dict], target: float) -> dict:
    """From one run's metrics.jsonl records: the first whole validation pass at or below `target`, its step, the
    training seconds to it (evaluations, screening passes included, excluded) and the wall seconds (included);
    or, when no pass got there, the same figures for the last one with reached=False. Also the number of whole
    passes and of screening passes (trainer.eval_screen_batches) up to it."""
    eval_seconds, mark, found, passes, screens = 0.0, {}, None, 0, 0
    for record in records:
        if "loss" in record:
            mark[record["step"]] = record["elapsed_s"]
        if "val_loss" not in record and "val_screen_loss" not in record:
            continue
        started = mark.get(record["step"])
        if started is None:
            raise SystemExit(f"no step record just before the evaluation at step {record['step']}: log_every must "
                             "divide eval_every")
        eval_seconds += record["elapsed_s"] - started  # from the step, or the screening pass just before
        mark[record["step"]] = record["elapsed_s"]
        if "val_loss" not in record:
            screens += 1
            continue
        passes += 1
        found = {"step": record["step"], "val_loss": record["val_loss"], "wall_s": record["elapsed_s"],
                 "train_s": record["elapsed_s"] - eval_seconds, "reached": record["val_loss"] <= target,
                 "whole_passes": passes, "screening_passes": screens}
        if found["reached"]:
            break
    if found is None:
        raise SystemExit("the run logged no evaluation")
    return found


def train(recipe: str, data: Path, run_dir: Path, eval_every: int, extra: list[str]) -> tuple[list[dict], dict]:
    """One `lmtrain train` run; returns its metrics records, and the precision and compilation its log names
    and the process's whole wall time (start-up, data, compiling and the final save included)."""
    overrides = [f"experiment={recipe}", f"data.train_files=[{data}]", f"trainer.eval_every={eval_every}",
                 f"trainer.log_every={eval_every}", "trainer.save_every=0", "trainer.progress=false",
                 f"hydra.run.dir={run_dir}", *extra]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "lmtrain", "train", *overrides], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"lmtrain train {' '.join(overrides)} failed:\n{output[-3000:]}")
    precision = re.search(r"Precision (\w+): ", output)  # the trainer's "Precision bf16: <why auto chose it>" line
    compiled = re.search(r"Compilation (on|off): ", output)
    return read_metrics(run_dir / "metrics.jsonl"), {"precision": precision[1] if precision else "?",
                                                     "compile": compiled[1] if compiled else "?",
                                                     "process_s": seconds}


def seconds(r: dict) -> str:
    return f"{r['train_s']:.1f}" if r["reached"] else f"> {r['train_s']:.1f}"


def report_table(rows: list[dict], target: float) -> Table:
    table = Table(title=f"Training time to validation loss <= {target}", title_justify="left")
    for col in ["round", "recipe", "precision", "compile", "step", "val loss", "passes", "training s", "wall s",
                "process s", "ratio (training)", "ratio (wall)"]:
        table.add_column(col, justify="left" if col in ("recipe", "precision", "compile") else "right")
    for r in rows:
        passes = f"{r['whole_passes']}" + (f" + {r['screening_passes']} screens" if r["screening_passes"] else "")
        table.add_row(str(r["round"]), r["recipe"], r["precision"], r["compile"], str(r["step"]),
                      f"{r['val_loss']:.4f}", passes, seconds(r), f"{r['wall_s']:.1f}", f"{r['process_s']:.1f}",
                      r.get("ratio_text", ""), r.get("wall_ratio_text", ""))
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
                records, run = train(RECIPES[name], data, root / f"{name}_{round_}", every[name], extra)
                results[name] = {"round": round_, "recipe": name, **run, "load_average": os.getloadavg()[0],
                                 **time_to_target(records, args.target)}
                r = results[name]
                console.log(f"round {round_}, {name} ({r['precision']}, compile {r['compile']}): val "
                            f"{r['val_loss']:.4f} at step {r['step']}, training {seconds(r)} s, wall {r['wall_s']:.1f}"
                            f" s, process {r['process_s']:.1f} s; load average {r['load_average']:.2f}")
            fast, slow = results["speedrun"], results["nanogpt"]
            if fast["reached"]:
                bound = "" if slow["reached"] else "< "
                fast["ratio"] = fast["train_s"] / slow["train_s"]
                fast["ratio_text"] = f"{bound}{fast['ratio']:.3f}"
                fast["wall_ratio"] = fast["wall_s"] / slow["wall_s"]
                fast["wall_ratio_text"] = f"{bound}{fast['wall_ratio']:.3f}"
                fast["of_nanogpt_reference"] = {k: fast[k] / NANOGPT_REFERENCE_S for k in ("train_s", "wall_s",
                                                                                             "process_s")}
            rows += [results["nanogpt"], results["speedrun"]]
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    console.print(report_table(rows, args.target))
    ratios = [r["ratio"] for r in rows if "ratio" in r]
    if ratios:
        console.print(f"speedrun / nanoGPT recipe, training time: median {statistics.median(ratios):.3f}, "
                      f"worst {max(ratios):.3f} over {len(ratios)} rounds; wall time (evaluations included): median "
                      f"{statistics.median(r['wall_ratio'] for r in rows if 'wall_ratio' in r):.3f}")
        for r in (r for r in rows if "of_nanogpt_reference" in r):
            shares = r["of_nanogpt_reference"]
            console.print(f"round {r['round']}: against nanoGPT's own {NANOGPT_REFERENCE_S:.0f} s on this machine "
                          f"kind: training {shares['train_s']:.3f}, wall {shares['wall_s']:.3f}, whole process "
                          f"{shares['process_s']:.3f}")
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
