"""Training tokens/s and MFU: the real `lmtrain train` against a bare PyTorch loop of the same model and step.

    python scripts/bench.py                              # default cases: fp32, and bf16 where native; compile off
    python scripts/bench.py --case gpt_tiny,block_size=64,batch=12 --precision fp32 --compile off on --rounds 3
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
MFU is against lmtrain.training.mfu's peak (a GPU's data sheet, or this machine's measured matmul peak, cached).
On a shared machine wrap it in `flock /tmp/lmtrain-bench.lock` and read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import random
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
from lmtrain.training.precision import PrecisionChoice, autocast_for, choose, native_cpu_bf16

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


def bare(cfg: ModelConfig, batch: int, device: torch.device, precision: str, compile_model: bool, warmup: int,
         steps: int) -> tuple[list[float], int | None]:
    """Tokens/s of each WINDOW-step window of a plain training loop, after `warmup` untimed steps, and the
    peak CUDA memory (None on a CPU)."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    if compile_model:
        model.compile_blocks()  # as the trainer compiles: per block
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
    rates = []
    for w in range(max(1, steps // WINDOW)):
        start = time.perf_counter()
        for i in range(WINDOW):
            step(w * WINDOW + i)
        sync(device)  # the GPU may still be working through queued steps
        rates.append(WINDOW * batch * cfg.block_size / (time.perf_counter() - start))
    return rates, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def write_corpus(folder: Path, chars: int = 300_000) -> Path:
    """A text of `chars` random characters from a 65-character alphabet (vocabulary 68 with the specials)."""
    rng = random.Random(0)
    path = folder / "corpus.txt"
    path.write_text(ALPHABET + "".join(rng.choices(ALPHABET, k=chars)))
    return path


def lmtrain_train(preset: str, overrides: dict[str, str], batch: int, precision: str, compile_model: bool,
                  steps: int, corpus: Path, run_dir: Path) -> tuple[list[float], int | None]:
    """The logged tokens/s of a real `lmtrain train` run of the case (every window after its warm-up), and the
    peak CUDA memory it logged (None on a CPU)."""
    args = [f"model={preset}", *[f"model.{k}={v}" for k, v in overrides.items()], f"trainer.batch_size={batch}",
            "data=text_files", f"data.train_files=[{corpus}]", f"data.cache_dir={run_dir.parent / 'cache'}",
            "tokenizer=char", f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", "trainer.eval_batches=1",
            "trainer.save_every=0", f"trainer.log_every={WINDOW}", f"trainer.precision={precision}",
            f"trainer.compile={str(compile_model).lower()}", "optimizer.lr=1e-3", "scheduler.warmup_steps=10",
            f"hydra.run.dir={run_dir}"]
    result = subprocess.run([sys.executable, "-m", "lmtrain", "train", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"lmtrain train failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    records = read_metrics(run_dir / "metrics.jsonl")
    # every full window; the last one may be cut short by max_steps, and it ends with the final evaluation
    rates = [r["tokens_per_s"] for r in records if r.get("tokens_per_s") is not None and r["step"] % WINDOW == 0]
    return rates, max((r["peak_memory"] for r in records if "peak_memory" in r), default=None)


def bench_case(spec: str, device: torch.device, precision: str, compile_model: bool, args, workdir: Path,
               console: Console) -> list[dict]:
    """Rows of both ways for one case, printed as each finishes."""
    preset, overrides, cfg, batch = parse_case(spec)
    model = GPT(cfg)  # for its FLOPs per token and parameter count; each run builds its own
    mfu = Mfu(device, precision, model.flops_per_token())
    corpus = write_corpus(workdir)
    warmup = args.warmup if args.warmup is not None else (5 if compile_model else 3)
    rows = []
    for round_ in range(args.rounds):
        steps = args.steps
        ways = ["bare", "lmtrain"] if round_ % 2 == 0 else ["lmtrain", "bare"]
        medians = {}
        for way in ways:
            start = time.perf_counter()
            if way == "bare":
                rates, peak_memory = bare(cfg, batch, device, precision, compile_model, warmup, steps)
            else:
                run_dir = workdir / f"run_{len(list(workdir.glob('run_*')))}"
                rates, peak_memory = lmtrain_train(preset, overrides, batch, precision, compile_model,
                                                   steps + warmup, corpus, run_dir)
            rate = statistics.median(rates) if rates else float("nan")
            medians[way] = rate
            row = {"case": spec, "model": cfg.name, "layers": cfg.n_layers, "d_model": cfg.d_model,
                   "block_size": cfg.block_size, "batch": batch, "params": model.num_params(), "way": way,
                   "round": round_ + 1, "precision": precision, "compile": compile_model, "windows": len(rates),
                   "tokens_per_s": rate, "mfu": mfu(rate) if rates else None, "peak_flops": mfu.peak,
                   "peak_source": mfu.source, "peak_memory": peak_memory, "seconds": time.perf_counter() - start}
            rows.append(row)
            console.print(f"{spec} {precision} compile {'on' if compile_model else 'off'} round {round_ + 1} "
                          f"{way}: {rate:,.0f} tokens/s over {len(rates)} windows")
        ratio = medians["lmtrain"] / medians["bare"]
        for row in rows[-2:]:
            row["lmtrain_over_bare"] = ratio
        console.print(f"  lmtrain/bare = {ratio:.3f}")
    return rows


def results_table(rows: list[dict], title: str) -> Table:
    table = Table(title=f"Training throughput on {title}", title_justify="left")
    for col in ["model", "params", "batch x block", "precision", "compile", "round", "way", "tokens/s", "MFU",
                "lmtrain/bare"]:
        table.add_column(col, justify="left" if col in ("model", "way") else "right")
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        table.add_row(f"{r['model']} {r['layers']}L/{r['d_model']}", f"{r['params'] / 1e6:.2f}M",
                      f"{r['batch']} x {r['block_size']}", r["precision"], "on" if r["compile"] else "off",
                      str(r["round"]), r["way"], f"{r['tokens_per_s']:,.0f}", mfu, f"{r['lmtrain_over_bare']:.3f}")
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
    parser.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off"])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--warmup", type=int, default=None, help="bare's untimed steps (default: 3 eager, 5 compiled)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per run (windows of 10)")
    parser.add_argument("--rounds", type=int, default=2, help="bare and lmtrain runs of each case, alternating")
    parser.add_argument("--probe", action="store_true", help="measure the matmul peaks again, cache them and exit")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = parser.parse_args()

    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer: TF32 for float32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    precisions = args.precision or default_precisions(device)
    console = Console(width=None if sys.stdout.isatty() else 140)  # a pipe or a log file: wide enough for the table
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
    if args.json:
        report = {"device": title, "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "results": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
