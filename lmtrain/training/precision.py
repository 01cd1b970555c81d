"""A run's number format: what `precision=auto` picks on this device and why, autocast, and fp16's loss scaling.

- CPU: bf16 only where the CPU has native bf16 instructions (AMX or AVX512-BF16), its matmuls measure
  faster than fp32's (the measured peaks of lmtrain.training.mfu, probed once per machine and cached), and, for a
  model small enough that a step takes under a second, its own training step measures faster in bf16
  too (`confirm_on_model`: small matmuls gain less from bf16 and pay for the casts); fp32 otherwise.
  Without those instructions every bf16 matmul is emulated and several times slower.
- CUDA: bf16 at compute capability 8.0 and above (Ampere on); below it bf16 is emulated, so fp16 with a
  GradScaler: the loss is scaled up before the backward pass so small gradients do not flush to zero, the
  gradients are unscaled before clipping, and a step whose gradients hold inf or NaN is skipped (counted).

Weights and optimizer state stay float32 in every mode: autocast runs the matmuls in the low precision.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmtrain.config import Precision
from lmtrain.distributed import collectives
from lmtrain.training.mfu import cache_file, cached_measurement, machine_key, peak_flops

if TYPE_CHECKING:
    from lmtrain.model import GPT

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_BF16_SPEEDUP = 1.2  # on a CPU, bf16 must measure at least this much faster than fp32 for auto to pick it
MIN_STEP_SPEEDUP = 1.05  # ... and the model's own training step at least this much faster
STEP_PROBE_MAX_SECONDS = 1.0  # a step estimated longer is large-matmul work, which the matmul probe speaks for
STEP_CACHE_FILE = "bf16_step_speedup.json"


@dataclass(frozen=True)
class PrecisionChoice:
    name: str  # fp32, bf16 or fp16
    reason: str  # why, in words for the log

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`); empty where there is none."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return frozenset()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_cpu_bf16() -> str | None:
    """The native bf16 instructions this CPU has ("AMX", "AVX512-BF16", "Arm BF16"), or None where bf16 is
    emulated. From PyTorch's own CPU checks (the cpuinfo library), and /proc/cpuinfo's flags."""
    flags = cpu_flags()
    if torch.cpu._is_amx_tile_supported() or "amx_bf16" in flags:
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported() or "avx512_bf16" in flags:
        return "AVX512-BF16"
    if platform.machine() in ("aarch64", "arm64") and "bf16" in flags:
        return "Arm BF16"
    return None


def bf16_speedup(device: torch.device) -> float:
    """How many times faster a large bf16 matmul runs than an fp32 one here (measured peaks, cached)."""
    return peak_flops(device, "bf16")[0] / peak_flops(device, "fp32")[0]


def choose(setting: Precision, device: torch.device, key: str = "trainer.precision") -> PrecisionChoice:
    """Resolve `setting` for `device`; warns when an explicit choice is slow here."""
    if device.type == "cuda":
        return _choose_cuda(setting, device, key)
    native = native_cpu_bf16()
    if setting == Precision.auto:
        if native is None:
            return PrecisionChoice("fp32", "this CPU has no native bf16 instructions (AMX or AVX512-BF16)")
        speedup = bf16_speedup(device)
        if speedup < MIN_BF16_SPEEDUP:
            return PrecisionChoice("fp32", f"the CPU has {native}, but bf16 matmuls measured only {speedup:.2f}x "
                                           "fp32's speed here")
        return PrecisionChoice("bf16", f"the CPU has {native}; bf16 matmuls measured {speedup:.1f}x fp32's speed")
    if setting == Precision.bf16 and native is None:
        slowdown = 1 / bf16_speedup(device)
        log.warning("%s=bf16 on a CPU without native bf16 instructions (AMX or AVX512-BF16): bf16 matmuls are "
                    "emulated and measured %.1fx slower than fp32 here; %s=auto picks fp32", key, slowdown, key)
    return PrecisionChoice(setting.value, f"{key}={setting.value}")


def _choose_cuda(setting: Precision, device: torch.device, key: str) -> PrecisionChoice:
    major, minor = torch.cuda.get_device_capability(device)
    native_bf16 = major >= 8
    if setting == Precision.auto:
        if native_bf16:
            return PrecisionChoice("bf16", f"compute capability {major}.{minor} has native bf16")
        return PrecisionChoice("fp16", f"compute capability {major}.{minor} < 8.0 has no native bf16: fp16 with "
                                       "loss scaling")
    if setting == Precision.bf16 and not native_bf16:
        log.warning("%s=bf16 on a GPU of compute capability %d.%d, which emulates bf16 (slow, and no flash "
                    "attention); %s=auto picks fp16 with loss scaling", key, major, minor, key)
    return PrecisionChoice(setting.value, f"{key}={setting.value}")


def confirm_on_model(choice: PrecisionChoice, model: GPT, batch: int, device: torch.device) -> PrecisionChoice:
    """`auto`'s choice on a CPU, with bf16 kept only if this model's training step (forward and backward at
    `batch` sequences) measures at least MIN_STEP_SPEEDUP faster in bf16 than in fp32, and only if every
    rank keeps it (one collective, on every rank). Measured once per machine, model shape and batch, and
    cached beside the matmul peaks. A model whose step would take over STEP_PROBE_MAX_SECONDS is not timed:
    its matmuls are large, and the matmul probe already speaks for them."""
    if device.type != "cpu":
        return choice
    speedup, cfg = None, model.cfg
    if choice.name == "bf16":
        estimate = model.flops_per_token() * batch * cfg.block_size / peak_flops(device, "bf16")[0]
        if estimate <= STEP_PROBE_MAX_SECONDS:
            speedup = _cached_step_speedup(model, batch, device)
    keep = choice.name == "bf16" and (speedup is None or speedup >= MIN_STEP_SPEEDUP)
    every_rank_keeps = collectives.smallest(int(keep), device) == 1
    step = f"this model's training step (batch {batch} x {cfg.block_size})"
    if every_rank_keeps:
        return choice if speedup is None else PrecisionChoice(
            "bf16", f"{choice.reason}; {step} measured {speedup:.2f}x fp32's speed in bf16")
    if choice.name != "bf16":
        return choice
    if not keep:
        return PrecisionChoice("fp32", f"{choice.reason}, but {step} measured only {speedup:.2f}x fp32's speed "
                                       "in bf16")
    return PrecisionChoice("fp32", f"{choice.reason}, but another rank measured {step} no faster in bf16")


def _cached_step_speedup(model: GPT, batch: int, device: torch.device) -> float:
    shape = json.dumps({**{k: str(v) for k, v in vars(model.cfg).items() if k not in ("name", "init_from")},
                        "batch": batch}, sort_keys=True)
    key = f"{machine_key(device, 'bf16 step')} | {hashlib.sha1(shape.encode()).hexdigest()[:16]}"
    return cached_measurement(cache_file().with_name(STEP_CACHE_FILE), key,
                              lambda: step_speedup(model, batch, device),
                              "bf16 speed-up of this model's training step, timed in bf16 and fp32")


def step_speedup(model: GPT, batch: int, device: torch.device, repeats: int = 3) -> float:
    """fp32's step time over bf16's: the best of `repeats` forward and backward passes of `model` on random
    tokens in each, taken in turn after one untimed pass each. The weights do not change, the gradients are
    cleared after, and the global RNG (dropout's) is left where it was."""
    tokens = torch.randint(model.cfg.vocab_size, (batch, model.cfg.block_size), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))
    best = {"fp32": float("inf"), "bf16": float("inf")}
    with torch.random.fork_rng(devices=[]):
        for i in range(repeats + 1):
            for name in best:
                start = time.perf_counter()
                with autocast_for(device, PrecisionChoice(name, "")):
                    loss = model(tokens, tokens)
                loss.backward()
                if i:  # the first pass of each is warm-up
                    best[name] = min(best[name], time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return best["fp32"] / best["bf16"]


def use_tf32(device: torch.device) -> None:
    """TF32 tensor cores for any float32 matmul and convolution left outside autocast, on CUDA, through the
    fp32_precision settings (torch 2.9 on; the older allow_tf32 flags must not be mixed with them)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"


def autocast_for(device: torch.device, choice: PrecisionChoice) -> contextlib.AbstractContextManager:
    if choice.name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=choice.dtype)


class TrainingPrecision:
    """What the training step does differently per precision: autocast, backward, clip and step.

        with precision.autocast():
            loss = model(x, y)
        precision.backward(loss)
        grad_norm = precision.step(optimizer, params, clip)
    """

    def __init__(self, choice: PrecisionChoice, device: torch.device):
        self.choice, self.device = choice, device
        self.scaler = torch.amp.GradScaler(device.type) if choice.name == "fp16" else None
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)  # a tensor: counting needs no sync
        self._skipped_before = 0  # steps skipped before a resume

    @property
    def name(self) -> str:
        return self.choice.name

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_for(self.device, self.choice)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], clip: float,
             want_norm: bool = True) -> torch.Tensor | None:
        """Clip (when clip > 0) and step; returns the gradient norm before clipping, or None when clipping is
        off and want_norm is False. Under fp16 the gradients are unscaled first, and a step with inf or NaN
        gradients is skipped and counted (the scaler then lowers its scale)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        norm = None
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        elif want_norm:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if self.scaler is None:
            optimizer.step()
        else:
            # unscale_ recorded, per device, whether it found inf or NaN: scaler.step skips the step if so
            found_inf = sum(self.scaler._found_inf_per_device(optimizer).values())
            self.scaler.step(optimizer)
            self.scaler.update()
            self._skipped += found_inf.to(torch.int64)
        return norm

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for inf or NaN gradients (fp16 only), resumed runs included. Syncs."""
        return self._skipped_before + int(self._skipped.item())

    def state_dict(self) -> dict:
        """JSON-ready: the scaler's scale and growth tracker, and the skipped-step count."""
        if self.scaler is None:
            return {}
        return {"grad_scaler": self.scaler.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is None or not state:
            return
        self.scaler.load_state_dict(state["grad_scaler"])
        self._skipped_before, self._skipped = state["skipped_steps"], torch.zeros_like(self._skipped)
