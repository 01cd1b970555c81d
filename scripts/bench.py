"""Training throughput and MFU on this machine's device, for each model x precision x compile.

    python scripts/bench.py                                  # the default cases for this device
    python scripts/bench.py --case gpt_tiny,block_size=64,batch=12 --precision fp32 bf16 --compile off on
    python scripts/bench.py --json bench.json                # also write the results as JSON

A case is a model preset from configs/model/ with overrides of its keys, plus `batch=` (sequences per
step). Each case trains a fresh model on random tokens with the step `lmtrain train` takes: forward and
backward under the trainer's autocast, gradient clipping, AdamW. The first --warmup steps (which include
compilation) are not timed; tokens/s is measured over the next --seconds. MFU is the model's FLOPs per token
(6N plus attention) times tokens/s, over the device's peak: a data sheet for known GPUs, a measured matmul
elsewhere. On a shared machine wrap it in `flock /tmp/lmtrain-bench.lock` and compare within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from lmtrain.config import ModelConfig, OptimizerConfig
from lmtrain.metrics import peak_flops
from lmtrain.model import GPT
from lmtrain.optim import build_optimizer
from lmtrain.trainer import accumulate_gradients, pick_device

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "model"
# nanoGPT's CPU shakespeare_char shape and its 6-layer shape (vocab 68: 65 characters and 3 special tokens),
# and the Llama-style block at the first shape.
CPU_CASES = [
    "gpt_tiny,block_size=64,bias=false,vocab_size=68,batch=12",
    "gpt_tiny,n_layers=6,n_heads=6,d_model=384,d_ff=1536,block_size=256,bias=false,vocab_size=68,batch=8",
    "llama_tiny,block_size=64,vocab_size=68,batch=12",
]
CUDA_CASES = ["gpt_small,vocab_size=50304,batch=16"]  # GPT-2 124M, block 1024, vocabulary padded to 64 x 786


def parse_case(spec: str) -> tuple[ModelConfig, int]:
    """'preset,key=value,...,batch=N' -> (the preset's ModelConfig with the overrides, batch size)."""
    preset, *pairs = spec.split(",")
    overrides = dict(pair.split("=", 1) for pair in pairs)
    batch = int(overrides.pop("batch", 8))
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(PRESETS / f"{preset}.yaml"),
                             OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))
    cfg: ModelConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if cfg.vocab_size is None:
        raise SystemExit(f"case {spec!r}: set vocab_size=N")
    return cfg, batch


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    return f"{names[0] if names else platform.machine()} CPU, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_case(cfg: ModelConfig, batch: int, device: torch.device, bf16: bool, compile_model: bool, warmup: int,
               seconds: float, min_steps: int = 3) -> dict:
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    if compile_model:
        model.compile_blocks()  # as the trainer compiles: per block
    forward = model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = build_optimizer(model, OptimizerConfig(), device.type)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    tokens = torch.randint(0, cfg.vocab_size, (8, batch, cfg.block_size + 1), device=device)  # reused in turn
    params = list(model.parameters())

    def step(i: int) -> None:
        window = tokens[i % len(tokens)]
        accumulate_gradients(forward, [(window[:, :-1], window[:, 1:])], device, autocast)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync(device)
    timed = time.perf_counter()
    steps = 0
    while steps < min_steps or time.perf_counter() - timed < seconds:
        step(steps)
        steps += 1
    sync(device)  # the GPU may still be working through queued steps
    seconds = time.perf_counter() - timed
    tokens_per_s = steps * batch * cfg.block_size / seconds
    peak, source = peak_flops(device, bf16)
    return {"model": cfg.name, "params": model.num_params(), "layers": cfg.n_layers, "d_model": cfg.d_model,
            "block_size": cfg.block_size, "batch": batch, "precision": "bf16" if bf16 else "fp32",
            "compile": compile_model, "steps": steps, "tokens_per_s": tokens_per_s, "step_ms": 1000 * seconds / steps,
            "flops_per_token": model.flops_per_token(), "mfu": tokens_per_s * model.flops_per_token() / peak,
            "peak_flops": peak, "peak_source": source, "warmup_s": timed - start,
            "peak_memory": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def results_table(rows: list[dict], device_name: str) -> Table:
    table = Table(title=f"Training throughput on {device_name}", title_justify="left")
    for col in ["model", "params", "batch x block", "precision", "compile", "tokens/s", "ms/step", "MFU", "warm-up s"]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        model = f"{r['model']} {r['layers']}L/{r['d_model']}"
        table.add_row(model, f"{r['params'] / 1e6:.2f}M", f"{r['batch']} x {r['block_size']}", r["precision"],
                      "on" if r["compile"] else "off", f"{r['tokens_per_s']:,.0f}", f"{r['step_ms']:.1f}",
                      f"{100 * r['mfu']:.1f}%", f"{r['warmup_s']:.1f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help="preset[,key=value...][,batch=N]; repeatable")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 3 eager, 5 compiled)")
    parser.add_argument("--seconds", type=float, default=4.0, help="time each case for this long (at least 3 steps)")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = parser.parse_args()

    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer: TF32 for float32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    cases = args.case or (CUDA_CASES if device.type == "cuda" else CPU_CASES)
    console = Console(width=None if sys.stdout.isatty() else 120)  # a pipe or a log file: wide enough for the table
    rows = []
    for spec in cases:
        cfg, batch = parse_case(spec)
        for precision in args.precision:
            for compiled in args.compile:
                on = compiled == "on"
                warmup = args.warmup if args.warmup is not None else (5 if on else 3)
                console.log(f"{spec} {precision} compile {compiled}")
                row = bench_case(cfg, batch, device, precision == "bf16", on, warmup, args.seconds)
                rows.append({"case": spec, **row})
    console.print(results_table(rows, device_name))
    if args.json:
        report = {"device": device_name, "torch": torch.__version__, "results": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
