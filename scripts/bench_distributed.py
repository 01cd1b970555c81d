"""Training tokens/s at 1, 2, ... processes through the real CLI, with the scaling efficiency.

    python scripts/bench_distributed.py                          # 1 and 2 processes (more where there are GPUs)
    python scripts/bench_distributed.py --procs 1 2 4 8 --strategy ddp fsdp --steps 60
    python scripts/bench_distributed.py --single                 # also DDP on one process against single

Each case runs `lmtrain train trainer.nproc_per_node=N` with the same per-rank batch (weak scaling: the global
batch grows with N) on the built-in corpus, and reads tokens/s (all ranks together) from metrics.jsonl,
as the median over the steps after the first --warmup; the cases run in alternating rounds and the best
round counts. Efficiency = tokens/s at N / (N x tokens/s at 1 with
the same strategy). --single adds `trainer.strategy=ddp` at one process against `single`: the DDP wrapper's
own overhead. On a shared machine wrap it in `flock /tmp/lmtrain-bench.lock`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lmtrain.runs.metrics import read_metrics
from lmtrain.training.mfu import cpu_model

CPU_MODEL = ["model.n_layers=4", "model.d_model=128", "model.n_heads=4", "model.d_ff=512", "model.block_size=64"]


def tokens_per_s(nproc: int, strategy: str, args: argparse.Namespace, workdir: Path) -> float:
    run = workdir / f"{strategy}-{nproc}"
    command = [sys.executable, "-m", "lmtrain", "train", *args.model, f"trainer.batch_size={args.batch}",
               f"trainer.max_steps={args.steps}", "trainer.log_every=1", f"trainer.eval_every={args.steps}",
               "trainer.eval_batches=1", "trainer.save_every=0", "trainer.progress=false", "trainer.sample_every=0",
               f"trainer.nproc_per_node={nproc}", f"trainer.strategy={strategy}", f"trainer.device={args.device}",
               f"data.max_documents={args.documents}", f"hydra.run.dir={run}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    # null while the step time settles (compilation, first steps): the run's own warm-up, left out as well
    rates = [r["tokens_per_s"] for r in read_metrics(run / "metrics.jsonl") if r.get("tokens_per_s") is not None]
    return statistics.median(rates[args.warmup:] or rates)


def main() -> None:
    gpus = torch.cuda.device_count()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, nargs="+",
                        default=[n for n in (1, 2, 4, 8) if n <= max(2, gpus)])
    parser.add_argument("--strategy", nargs="+", default=["ddp"], choices=["ddp", "fsdp"])
    parser.add_argument("--single", action="store_true", help="also one process with strategy=single vs ddp")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over all cases; the best counts")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the median")
    parser.add_argument("--documents", type=int, default=300, help="data.max_documents of the built-in corpus")
    parser.add_argument("--model", nargs="*", default=CPU_MODEL if gpus == 0 else ["model=gpt_small"],
                        help="model overrides")
    args = parser.parse_args()

    device = torch.cuda.get_device_name(0) if gpus else f"CPU: {cpu_model()}, {os.cpu_count()} cores"
    print(f"{device}; torch {torch.__version__}; per-rank batch {args.batch}; {' '.join(args.model)}", flush=True)
    cases = [("single", 1), ("ddp", 1)] if args.single else []
    cases = list(dict.fromkeys(cases + [(strategy, n) for strategy in args.strategy for n in args.procs]))
    rates: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):  # alternating rounds: a load that comes and goes hits every case
            for strategy, n in cases:
                rates[(strategy, n)].append(tokens_per_s(n, strategy, args, Path(tmp)))
                print(f"  round {round_ + 1}: {strategy} x {n}: {rates[(strategy, n)][-1]:,.0f} tokens/s", flush=True)
    best = {case: max(r) for case, r in rates.items()}
    print(f"{'strategy':<10}{'procs':>6}{'tokens/s':>12}{'efficiency':>12}   (best of {args.rounds} rounds)")
    for strategy, n in cases:
        base = best.get((strategy, 1))
        efficiency = f"{100 * best[(strategy, n)] / (n * base):.0f}%" if base and strategy != "single" else ""
        print(f"{strategy:<10}{n:>6}{best[(strategy, n)]:>12,.0f}{efficiency:>12}")
    if args.single:
        print(f"DDP overhead at one process: {100 * (1 - best[('ddp', 1)] / best[('single', 1)]):.1f}%")

if __name__ == "__main__":
    main()
