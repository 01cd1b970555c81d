"""`trainer.compile`: whether the model's blocks and loss region go through torch.compile, and why.

`true` and `false` are obeyed. `auto` compiles where it pays: compiling costs a fixed time at the start (10-60
s, less once inductor's on-disk cache holds the kernels) and then saves a share of every step. So `auto` needs
three figures for this machine, precision, model shape and batch: the eager step time, the compiled step
time and the compile time. They are measured once, by compiling the model and timing a few forward and
backward passes on random tokens (the model then stays compiled, so a run that keeps compilation pays
for it only once), and cached beside the MFU peaks. Compilation is on when the run's steps would save
more than the compile time: steps x (eager - compiled) > compile time.

A run too short to repay any compilation is not even measured: when its steps at the eager step time
estimated from the model's FLOPs and the device's peak take less than SHORT_RUN_SECONDS, `auto` is off
(tests, smoke runs, a 20-step check).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmtrain.distributed import collectives
from lmtrain.training.eta import duration as _duration
from lmtrain.training.mfu import cache_file, cached_measurement, machine_key, peak_flops

if TYPE_CHECKING:
    from lmtrain.model import GPT

log = logging.getLogger(__name__)

CACHE_FILE = "compile_gain.json"
SHORT_RUN_SECONDS = 60.0  # an eager run estimated shorter than this cannot repay a compile: auto stays off
ESTIMATED_MFU = 0.5  # for that estimate: eager steps at half the device's peak (an optimistic, short, guess)


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else _duration(seconds)


@dataclass(frozen=True)
class CompileChoice:
    on: bool
    reason: str  # why, in words for the log


def choose(setting: str, model: GPT, batch: int, total_steps: int, passes_per_step: int, device: torch.device,
           precision: str, autocast: Callable) -> CompileChoice:
    """Resolve trainer.compile (true, false, auto; checked by the config) for a run of `total_steps` optimizer
    steps of `passes_per_step` forward and backward passes of `batch` sequences, and compile the model when
    the answer is on. Under auto every rank takes part in one collective, and all of them agree."""
    setting = setting.lower()
    if setting in ("true", "false"):
        choice = CompileChoice(setting == "true", f"trainer.compile={setting}")
    else:
        choice = _auto(model, batch, total_steps, passes_per_step, device, precision, autocast)
        if collectives.smallest(int(choice.on), device) != int(choice.on):
            choice = CompileChoice(False, "another rank found that compiling would not pay")
    if choice.on and model.compiled_blocks is None:
        model.compile_blocks()
    elif not choice.on:
        model.uncompile()
    return choice


def _auto(model: GPT, batch: int, total_steps: int, passes_per_step: int, device: torch.device, precision: str,
          autocast: Callable) -> CompileChoice:
    passes = total_steps * passes_per_step
    flops = model.flops_per_token() * batch * model.cfg.block_size
    estimate = passes * flops / (ESTIMATED_MFU * peak_flops(device, precision)[0])
    if estimate < SHORT_RUN_SECONDS:
        return CompileChoice(False, f"trainer.compile=auto: this run's {total_steps} steps take about "
                                    f"{duration(estimate)} eagerly, too short to repay compiling")
    gain = cached_gain(model, batch, device, precision, autocast)
    eager, compiled = gain["eager_step_s"], gain["compiled_step_s"]
    measured = (f"a compiled forward and backward pass (batch {batch} x {model.cfg.block_size}) measured "
                f"{eager / compiled:.2f}x eager's speed ({compiled:.3g} s against {eager:.3g} s) after "
                f"{duration(gain['compile_s'])} of compiling")
    saved = passes * (eager - compiled)
    if saved > gain["compile_s"]:
        return CompileChoice(True, f"trainer.compile=auto: {measured}; over {total_steps} steps that saves about "
                                   f"{duration(saved)}")
    return CompileChoice(False, f"trainer.compile=auto: {measured}; over {total_steps} steps that would save "
                                f"{'nothing' if saved <= 0 else 'only about ' + duration(saved)}")


def cached_gain(model: GPT, batch: int, device: torch.device, precision: str, autocast: Callable) -> dict:
    """The eager and compiled times of a forward and backward pass of this model at `batch` sequences and the
    compile time (seconds),
    measured once per machine, precision, shape and batch (leaving the model compiled), then cached."""
    shape = json.dumps({**{k: str(v) for k, v in vars(model.cfg).items() if k not in ("name", "init_from")},
                        "batch": batch, "activation_checkpointing": model.activation_checkpointing}, sort_keys=True)
    key = f"{machine_key(device, precision)} | {hashlib.sha1(shape.encode()).hexdigest()[:16]}"
    return cached_measurement(cache_file().with_name(CACHE_FILE), key,
                              lambda: measure_gain(model, batch, device, autocast),
                              "compile time and speed-up for this model (compiling it once)")


def measure_gain(model: GPT, batch: int, device: torch.device, autocast: Callable) -> dict:
    """`measure_at(batch)`, or, where that runs out of memory (a GPU run whose micro-batch is searched only
    later), at the largest power-of-two fraction of it that fits, its step times scaled up to `batch`."""
    size = batch
    while True:
        try:
            gain = measure_at(model, size, device, autocast)
            break
        except torch.OutOfMemoryError:
            pass  # out of the except block first: the error's traceback holds the failed pass's activations
        model.zero_grad(set_to_none=True)
        model.uncompile()  # the next try times the eager model first, then compiles it again
        model.train()  # the failed try may have stopped in its evaluation pass
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if size == 1:
            raise torch.OutOfMemoryError("trainer.compile=auto: a forward and backward of one sequence does not fit")
        size //= 2
    scale = batch / size
    return {**gain, "eager_step_s": gain["eager_step_s"] * scale, "compiled_step_s": gain["compiled_step_s"] * scale}


def measure_at(model: GPT, batch: int, device: torch.device, autocast: Callable, repeats: int = 2) -> dict:
    """Time the model's forward and backward on random tokens: eagerly (the best of `repeats`, after one
    untimed pass), then compiled: the first compiled training pass and evaluation pass (no_grad) less the
    steps they stand for is the compile time, then the best of `repeats` compiled passes. The model is left
    compiled with its gradients cleared; the global RNG (dropout's) is left where it was."""
    tokens = torch.randint(model.cfg.vocab_size, (batch, model.cfg.block_size), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(grad: bool = True) -> float:
        sync()
        start = time.perf_counter()
        with torch.set_grad_enabled(grad), autocast():
            loss = model(tokens, tokens)
        if grad:
            loss.backward()
        sync()
        return time.perf_counter() - start

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        timed()
        eager = min(timed() for _ in range(repeats))
        model.eval()
        eager_eval = timed(grad=False)
        model.train()
        model.compile_blocks()
        first = timed()
        model.eval()
        first_eval = timed(grad=False)
        model.train()
        compiled = min(timed() for _ in range(repeats))
    model.zero_grad(set_to_none=True)
    compile_s = max(first - compiled, 0.0) + max(first_eval - eager_eval, 0.0)
    return {"eager_step_s": eager, "compiled_step_s": compiled, "compile_s": max(compile_s, 1e-3)}
