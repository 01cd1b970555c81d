"""Training tokens/s and MFU: the real `lmtrain train` against a bare PyTorch loop of the same model and step.

    python scripts/bench.py                              # default cases: fp32, and bf16 where native; eager, compiled
    python scripts/bench.py --case gpt_tiny,block_size=64,batch=12 --precision fp32 --compile off --rounds 3
    python scripts/bench.py --threads 1                  # one thread each: steadier figures on a shared machine
    python scripts/bench.py --probe                      # measure this machine's matmul peaks again (MFU's cache)
    python scripts/bench.py --json bench.json            # also write the results as JSON

A case is a model preset from configs/model/ with overrides of its keys, plus `batch=` (sequences per step).
Each case runs two ways, alternately for --rounds rounds (bare first in even rounds, lmtrain first in odd):
- `bare`: the model on random tokens in a plain loop with nothing else: autocast, forward, backward, clipping,
  AdamW (lmtrain's parameter groups), zero_grad. No loader, logging, checkpoints or progress bar.
- `lmtrain`: the real `lmtrain train` command on a synthetic 65-character corpus (character tokens), with
  the same model, batch, precision and compile setting; its logged tokens/s, read from metrics.jsonl.
Both report the median of 10-step windows after the step time settles (bare: after --warmup steps; lmtrain:
its own warm-up rule, lmtrain/training/clock.py), and `lmtrain/bare` is the ratio of those medians within a round.
With `--compile off on` (the default) a second table puts each way's compiled rate over its eager one.
MFU is against lmtrain.training.mfu's peak (a GPU's data sheet, or this machine's measured matmul peak, cached).
Each run also gives its CPU share: the CPU time the process (bare) or the `lmtrain train` process used over its
wall time times its threads; well below 1 means other work held the cores and the figure is low. The load
average is recorded before each run. On a shared machine wrap it in `flock /tmp/lmtrain-bench.lock`, read
the ratios, not the absolute figures, and prefer rounds whose CPU share is near 1.
The loss region (final norm, head, cross-entropy) is timed apart, forward and backward on random hidden
states: milliseconds per step and, on CUDA, the memory it adds (peak over what was allocated before).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
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

from lmtrain.config import ModelConfig, OptimizerConfig, Precision
from lmtrain.distributed.world import pick_device
from lmtrain.model import GPT
from lmtrain.runs.metrics import read_metrics
from lmtrain.training.mfu import Mfu, cpu_model, peak_flops
from lmtrain.training.optim import build_optimizer
from lmtrain.training.precision import PrecisionChoice, autocast_for, choose, native_cpu_bf16, use_tf32

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "model"
# nanoGPT's CPU shakespeare_char shape and its 6-layer shape (vocab 68: 65 characters and 3 special tokens),
# and the Llama-style block at the first shape.
CPU_CASES = [
    "gpt_tiny,block_size=64,bias=false,vocab_size=68,batch=12",
    "gpt_tiny,n_layers=6,n_heads=6,d_model=384,d_ff=1536,block_size=256,bias=false,vocab_size=68,batch=8",
]
CUDA_CASES = ["gpt_small,vocab_size=50304,batch=16"]  # GPT-2 124M, block 1024, vocabulary padded to 64 x 786
WINDOW = 10  # steps per timed window: lmtrain train's log_every
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'-\n&$3"  # 65 characters, as Shakespeare's


def parse_case(spec: str) -> tuple[str, dict[str, str], ModelConfig, int]:
    """'preset,key=value,...,batch=N' -> (preset, model overrides, the merged ModelConfig, batch size)."""
    preset, *pairs = spec.split(",")
    overrides = dict(pair.split("=", 1) for pair in pairs)
    batch = int(overrides.pop("batch", 8))
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(PRESETS / f"{preset}.yaml").model,
                             OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))
    cfg: ModelConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if cfg.vocab_size is None:
        raise SystemExit(f"case {spec!r}: set vocab_size=N")
    return preset, overrides, cfg, batch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    native = native_cpu_bf16()
    return (f"{cpu_model()} CPU, {torch.get_num_threads()} threads, "
            f"{'native bf16: ' + native if native else 'no native bf16'}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device_memory(device: torch.device) -> None:
    """Hand the cached CUDA memory of a finished run back, so the next run (another process) can have it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bare(cfg: ModelConfig, batch: int, device: torch.device, precision: str, compile_model: bool, warmup: int,
         steps: int) -> tuple[list[float], int | None, float]:
    """Tokens/s of each WINDOW-step window of a plain training loop, after `warmup` untimed steps, the peak
    CUDA memory (None on a CPU) and the CPU share of the timed windows."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    if compile_model:
        model.compile_blocks()  # as the trainer compiles: per block, and the loss region
    forward = model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = build_optimizer(model, OptimizerConfig(), device.type)
    choice = PrecisionChoice(precision, "bench")
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    tokens = torch.randint(0, cfg.vocab_size, (8, batch, cfg.block_size + 1), device=device)  # reused in turn
    params = list(model.parameters())

    def step(i: int) -> None:
        window = tokens[i % len(tokens)]
        with autocast_for(device, choice):
            loss = forward(window[:, :-1], window[:, 1:])
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    sync(device)
    rates, wall, cpu = [], 0.0, time.process_time()
    for w in range(max(1, steps // WINDOW)):
        start = time.perf_counter()
        for i in range(WINDOW):
            step(w * WINDOW + i)
        sync(device)  # the GPU may still be working through queued steps
        seconds = time.perf_counter() - start
        wall += seconds
        rates.append(WINDOW * batch * cfg.block_size / seconds)
    share = (time.process_time() - cpu) / (wall * torch.get_num_threads())
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return rates, peak, share


def loss_region(cfg: ModelConfig, batch: int, device: torch.device, precision: str, compile_model: bool,
                repeats: int = 10) -> dict:
    """The final norm, LM head and cross-entropy alone, forward and backward on random hidden states, as the
    model runs them: milliseconds per micro-batch (the best of `repeats` after 3 untimed) and, on CUDA, the
    memory the region adds at its peak over what its inputs and the head already hold."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    if compile_model:
        model.compile_blocks()
    x = torch.randn(batch, cfg.block_size, cfg.d_model, device=device, requires_grad=True)
    targets = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    choice = PrecisionChoice(precision, "bench")

    def run() -> None:
        with autocast_for(device, choice):
            loss = model.loss(x, targets)
        loss.backward()
        x.grad = None
        model.zero_grad(set_to_none=True)

    for _ in range(3):
        run()
    sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync(device)
        best = min(best, time.perf_counter() - start)
    added = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
    return {"loss_ms": 1e3 * best, "loss_peak_memory": added}


def write_corpus(folder: Path, chars: int = 300_000) -> Path:
    """A text of `chars` random characters from a 65-character alphabet (vocabulary 68 with the specials)."""
    rng = random.Random(0)
    path = folder / "corpus.txt"
    path.write_text(ALPHABET + "".join(rng.choices(ALPHABET, k=chars)))
    return path


def lmtrain_train(preset: str, overrides: dict[str, str], batch: int, precision: str, compile_model: bool,
                  steps: int, corpus: Path, run_dir: Path, threads: int) -> tuple[list[float], int | None, float]:
    """The logged tokens/s of a real `lmtrain train` run of the case (every window after its warm-up), the peak
    CUDA memory it logged (None on a CPU) and its CPU share over the whole run (start-up included)."""
    args = [f"model={preset}", *[f"model.{k}={v}" for k, v in overrides.items()], f"trainer.batch_size={batch}",
            "data=text_files", f"data.train_files=[{corpus}]", f"data.cache_dir={run_dir.parent / 'cache'}",
            "tokenizer=char", f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", "trainer.eval_batches=1",
            "trainer.save_every=0", f"trainer.log_every={WINDOW}", f"trainer.precision={precision}",
            f"trainer.compile={str(compile_model).lower()}", "optimizer.lr=1e-3", "scheduler.warmup_steps=10",
            f"hydra.run.dir={run_dir}"]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "lmtrain", "train", *args], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"lmtrain train failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    records = read_metrics(run_dir / "metrics.jsonl")
    # every full window; the last one may be cut short by max_steps, and it ends with the final evaluation
    rates = [r["tokens_per_s"] for r in records if r.get("tokens_per_s") is not None and r["step"] % WINDOW == 0]
    return rates, max((r["peak_memory"] for r in records if "peak_memory" in r), default=None), cpu / (wall * threads)


def bench_case(spec: str, device: torch.device, precision: str, compile_model: bool, args, workdir: Path,
               console: Console) -> list[dict]:
    """Rows of both ways for one case, printed as each finishes."""
    preset, overrides, cfg, batch = parse_case(spec)
    model = GPT(cfg)  # for its FLOPs per token and parameter count; each run builds its own
    mfu = Mfu(device, precision, model.flops_per_token())
    corpus = write_corpus(workdir)
    warmup = args.warmup if args.warmup is not None else (5 if compile_model else 3)
    loss = loss_region(cfg, batch, device, precision, compile_model)
    free_device_memory(device)
    rows = []
    for round_ in range(args.rounds):
        steps = args.steps
        ways = ["bare", "lmtrain"] if round_ % 2 == 0 else ["lmtrain", "bare"]
        medians = {}
        for way in ways:
            load, start = os.getloadavg()[0], time.perf_counter()
            if way == "bare":
                rates, peak_memory, share = bare(cfg, batch, device, precision, compile_model, warmup, steps)
                free_device_memory(device)  # the lmtrain run, another process, needs the GPU's memory
            else:
                run_dir = workdir / f"run_{len(list(workdir.glob('run_*')))}"
                rates, peak_memory, share = lmtrain_train(preset, overrides, batch, precision, compile_model,
                                                          steps + warmup, corpus, run_dir, torch.get_num_threads())
            rate = statistics.median(rates) if rates else float("nan")
            medians[way] = rate
            row = {"case": spec, "model": cfg.name, "layers": cfg.n_layers, "d_model": cfg.d_model,
                   "block_size": cfg.block_size, "batch": batch, "params": model.num_params(), "way": way,
                   "round": round_ + 1, "precision": precision, "compile": compile_model, "windows": len(rates),
                   "tokens_per_s": rate, "mfu": mfu(rate) if rates else None, "peak_flops": mfu.peak,
                   "peak_source": mfu.source, "peak_memory": peak_memory, "cpu_share": share, "load_average": load,
                   "threads": torch.get_num_threads(), "seconds": time.perf_counter() - start, **loss}
            rows.append(row)
            mfu_text = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
            console.print(f"{spec} {precision} compile {'on' if compile_model else 'off'} round {round_ + 1} "
                          f"{way}: {rate:,.0f} tokens/s, MFU {mfu_text}, over {len(rates)} windows; CPU share "
                          f"{share:.2f}, load average {load:.2f}")
        ratio = medians["lmtrain"] / medians["bare"]
        for row in rows[-2:]:
            row["lmtrain_over_bare"] = ratio
        console.print(f"  lmtrain/bare = {ratio:.3f}")
    return rows


def compile_rows(rows: list[dict]) -> list[dict]:
    """For each case, precision, way and round run both eagerly and compiled: compiled tokens/s over eager's."""
    out = []
    for r in rows:
        if not r["compile"]:
            continue
        eager = next((e for e in rows if not e["compile"] and all(e[k] == r[k] for k in
                                                                  ("case", "precision", "way", "round"))), None)
        if eager is not None:
            out.append({k: r[k] for k in ("case", "model", "layers", "d_model", "batch", "block_size", "precision",
                                          "way", "round")} | {"eager": eager["tokens_per_s"],
                                                              "compiled": r["tokens_per_s"],
                                                              "compiled_over_eager": r["tokens_per_s"] /
                                                              eager["tokens_per_s"]})
    return out


def results_table(rows: list[dict], title: str) -> Table:
    table = Table(title=f"Training throughput on {title}", title_justify="left")
    for col in ["model", "params", "batch x block", "precision", "compile", "round", "way", "tokens/s", "MFU",
                "CPU share", "lmtrain/bare", "loss ms", "loss memory"]:
        table.add_column(col, justify="left" if col in ("model", "way") else "right")
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        memory = "-" if r["loss_peak_memory"] is None else f"{r['loss_peak_memory'] / 2**20:,.0f} MiB"
        table.add_row(f"{r['model']} {r['layers']}L/{r['d_model']}", f"{r['params'] / 1e6:.2f}M",
                      f"{r['batch']} x {r['block_size']}", r["precision"], "on" if r["compile"] else "off",
                      str(r["round"]), r["way"], f"{r['tokens_per_s']:,.0f}", mfu, f"{r['cpu_share']:.2f}",
                      f"{r['lmtrain_over_bare']:.3f}", f"{r['loss_ms']:.1f}", memory)
    return table


def compile_table(rows: list[dict]) -> Table:
    table = Table(title="Compiled against eager (tokens/s)", title_justify="left")
    for col in ["model", "batch x block", "precision", "round", "way", "eager", "compiled", "compiled/eager"]:
        table.add_column(col, justify="left" if col in ("model", "way") else "right")
    for r in rows:
        table.add_row(f"{r['model']} {r['layers']}L/{r['d_model']}", f"{r['batch']} x {r['block_size']}",
                      r["precision"], str(r["round"]), r["way"], f"{r['eager']:,.0f}", f"{r['compiled']:,.0f}",
                      f"{r['compiled_over_eager']:.3f}")
    return table


def default_precisions(device: torch.device) -> list[str]:
    """fp32, and the low precision where it is native: bf16 on such a CPU; on CUDA what auto picks."""
    if device.type == "cuda":
        return [choose(Precision.auto, device).name]
    return ["fp32", "bf16"] if native_cpu_bf16() else ["fp32"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help="preset[,key=value...][,batch=N]; repeatable")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16"],
                        help="default: fp32, and bf16 where the CPU has it natively (CUDA: what auto picks)")
    parser.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off", "on"],
                        help="eager, compiled or both (default; a second table compares them)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both ways (default: torch's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--warmup", type=int, default=None, help="bare's untimed steps (default: 3 eager, 5 compiled)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per run (windows of 10)")
    parser.add_argument("--rounds", type=int, default=2, help="bare and lmtrain runs of each case, alternating")
    parser.add_argument("--probe", action="store_true", help="measure the matmul peaks again, cache them and exit")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = parser.parse_args()

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    use_tf32(device)  # as the trainer
    precisions = args.precision or default_precisions(device)
    console = Console(width=None if sys.stdout.isatty() else 170)  # a pipe or a log file: wide enough for the table
    title = device_name(device)
    if args.probe:
        for precision in precisions:
            peak, source = peak_flops(device, precision, reprobe=True)
            console.print(f"{title}: {precision} peak {peak / 1e12:.3f} TFLOP/s ({source}, cached)")
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmtrain-bench-") as tmp:
        for n, spec in enumerate(args.case or (CUDA_CASES if device.type == "cuda" else CPU_CASES)):
            for precision in precisions:
                for compiled in args.compile:
                    workdir = Path(tmp) / f"case_{n}_{precision}_{compiled}"
                    workdir.mkdir()
                    rows += bench_case(spec, device, precision, compiled == "on", args, workdir, console)
    console.print(results_table(rows, title))
    compiled = compile_rows(rows)
    if compiled:
        console.print(compile_table(compiled))
    if args.json:
        report = {"device": title, "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "results": rows, "compiled_over_eager": compiled}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
