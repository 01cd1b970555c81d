"""Model FLOPs utilization: the device's peak for the run's precision, and MFU figures that can be trusted.

The peak comes from the vendor's data sheet for a known GPU, matched by its exact device name ("NVIDIA L40"
is not the L4 and not the L40S). Elsewhere (a CPU, an unknown GPU) it is measured: the best of several
repeats of a matmul large enough to be compute-bound, synchronized on a GPU. A measurement is made once per
machine, precision and thread count and kept in lmtrain's cache folder (`LMTRAIN_CACHE`, default
~/.cache/lmtrain) as peak_flops.json; `scripts/bench.py --probe` measures again. An MFU above 100% means
the peak was under-measured (the machine was busy during the probe, say): the peak is re-measured once,
with a warning, and an MFU still above 100% is never reported.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from lmtrain.files import write_json

log = logging.getLogger(__name__)

# Dense peak TFLOP/s (no sparsity) from the vendors' data sheets, as (bf16, fp16, fp32 matmul: TF32 where the
# GPU has it), keyed by the exact names torch.cuda.get_device_name reports. None: no native support.
GPU_PEAK_TFLOPS: dict[str, tuple[float | None, float, float]] = {
    "NVIDIA B200": (2250.0, 2250.0, 1100.0),
    "NVIDIA H200": (989.4, 989.4, 494.7),  # SXM
    "NVIDIA H200 NVL": (835.5, 835.5, 417.5),
    "NVIDIA GH200 480GB": (989.4, 989.4, 494.7),
    "NVIDIA H100 80GB HBM3": (989.4, 989.4, 494.7),  # SXM
    "NVIDIA H100 NVL": (835.5, 835.5, 417.5),
    "NVIDIA H100 PCIe": (756.0, 756.0, 378.0),
    "NVIDIA A100-SXM4-80GB": (312.0, 312.0, 156.0),
    "NVIDIA A100-SXM4-40GB": (312.0, 312.0, 156.0),
    "NVIDIA A100 80GB PCIe": (312.0, 312.0, 156.0),
    "NVIDIA A100-PCIE-40GB": (312.0, 312.0, 156.0),
    "NVIDIA L40S": (362.1, 362.1, 183.0),
    "NVIDIA L40": (181.0, 181.0, 90.5),
    "NVIDIA L4": (121.0, 121.0, 60.0),
    "NVIDIA A10G": (70.0, 70.0, 35.0),
    "NVIDIA A10": (125.0, 125.0, 62.5),
    "NVIDIA RTX 6000 Ada Generation": (364.2, 364.2, 182.1),
    "NVIDIA RTX A6000": (154.8, 154.8, 77.4),
    "NVIDIA GeForce RTX 4090": (165.2, 165.2, 82.6),
    "NVIDIA GeForce RTX 3090": (71.0, 71.0, 35.6),
    "Tesla V100-SXM2-16GB": (None, 125.0, 15.7),
    "Tesla V100-SXM2-32GB": (None, 125.0, 15.7),
    "Tesla V100-PCIE-16GB": (None, 112.0, 14.0),
    "Tesla V100-PCIE-32GB": (None, 112.0, 14.0),
    "Tesla T4": (None, 65.0, 8.1),
}
_PRECISIONS = ("bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CACHE_FILE = "peak_flops.json"


def gpu_peak_flops(device_name: str, precision: str) -> float | None:
    """The data-sheet peak in FLOP/s for a GPU known by this exact name (case and spacing aside), else None.
    A GPU without native bf16 gets its fp32 figure for bf16: it emulates bf16 in fp32 units."""
    wanted = " ".join(device_name.split()).lower()
    for name, peaks in GPU_PEAK_TFLOPS.items():
        if name.lower() == wanted:
            tflops = peaks[_PRECISIONS.index(precision)]
            return (tflops if tflops is not None else peaks[2]) * 1e12
    return None


def cache_file() -> Path:
    return Path(os.environ.get("LMTRAIN_CACHE", "~/.cache/lmtrain")).expanduser() / CACHE_FILE


def machine_key(device: torch.device, precision: str) -> str:
    """What a measured peak depends on: the processor, the precision, the threads and torch's kernels."""
    if device.type == "cuda":
        processor = torch.cuda.get_device_name(device)
    else:
        processor = f"{cpu_model()} x{os.cpu_count()}"
    return f"{processor} | {precision} | {torch.get_num_threads()} threads | torch {torch.__version__}"


@cache
def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def probe_peak_flops(device: torch.device, precision: str, repeats: int = 5, min_seconds: float = 0.15) -> float:
    """The best matmul rate in FLOP/s over `repeats` timings, each at least `min_seconds` long.

    The size keeps the matmul compute-bound: 8192 on a GPU (4096 in fp32), where a smaller one is limited by
    kernel launches; on a CPU 2048, or less where a precision is emulated and a 512 matmul already takes
    long (fp16 on most CPUs: a 2048 one could take a minute). Best of several, because other work on the
    machine only slows it.
    """
    if device.type == "cuda":
        size = 4096 if precision == "fp32" else 8192
    else:
        size = min(2048, max(256, int(512 * (0.05 / _matmul_seconds(device, precision, 512)) ** (1 / 3))))
    a, b = _random_matrices(device, precision, size)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up: kernel selection, thread pool start
    sync()
    best = 0.0
    for _ in range(repeats):
        done, start = 0, time.perf_counter()
        while True:
            for _ in range(1 if device.type == "cpu" else 10):
                a @ b
                done += 1
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = max(best, 2 * size**3 * done / elapsed)
    return best


def _random_matrices(device: torch.device, precision: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random size x size matrices from a generator of their own: a probe inside a run must not move the
    global RNG, or the run's dropout would differ from a run that found the peak in the cache."""
    generator = torch.Generator(device=device).manual_seed(0)
    return tuple(torch.randn(size, size, device=device, dtype=_DTYPES[precision], generator=generator)
                 for _ in range(2))


def _matmul_seconds(device: torch.device, precision: str, size: int) -> float:
    """The time of one size x size matmul (after one untimed), to size the probe."""
    a, b = _random_matrices(device, precision, size)
    a @ b
    start = time.perf_counter()
    a @ b
    return max(time.perf_counter() - start, 1e-6)


def measured_peak_flops(device: torch.device, precision: str, reprobe: bool = False) -> float:
    """This machine's measured peak for `precision`, from the cache unless `reprobe` (then measured and stored)."""
    return cached_measurement(cache_file(), machine_key(device, precision),
                              lambda: probe_peak_flops(device, precision), f"{precision} matmul peak for MFU", reprobe)


def cached_measurement(path: Path, key: str, measure: Callable[[], float], what: str, remeasure: bool = False) -> float:
    """The positive figure stored under `key` in the JSON file `path`, or, when absent (or `remeasure`), the
    result of `measure()`, stored there for next time. An unreadable file is measured again and rewritten."""
    try:
        cached = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        cached = {}
    if not remeasure and isinstance(cached.get(key), (int, float)) and cached[key] > 0:
        return float(cached[key])
    log.info("Measuring this machine's %s (once; cached in %s)", what, path)
    figure = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {**cached, key: figure})
    except OSError as e:
        log.warning("Could not cache the measured %s in %s: %s", what, path, e)
    return figure


def peak_flops(device: torch.device, precision: str, reprobe: bool = False) -> tuple[float, str]:
    """The peak FLOP/s to measure MFU against, and where it came from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, precision)
        if peak is not None:
            return peak, f"{name} data sheet, {precision}"
    return measured_peak_flops(device, precision, reprobe), f"measured {precision} matmul"


class Mfu:
    """MFU = achieved FLOP/s (tokens/s x FLOPs per token) / the peak; never above 100%.

    A figure above 100% re-measures the peak once (with a warning); if it is still above, the peak cannot
    be trusted and MFU is reported as unknown (None) from then on.
    """

    def __init__(self, device: torch.device, precision: str, flops_per_token: float):
        self.device, self.precision, self.flops_per_token = device, precision, flops_per_token
        self.peak, self.source = peak_flops(device, precision)
        self._reprobed, self.trusted = False, True

    def __call__(self, tokens_per_s: float | None) -> float | None:
        if tokens_per_s is None or not self.trusted:
            return None
        mfu = tokens_per_s * self.flops_per_token / self.peak
        if mfu <= 1.0:
            return mfu
        if not self._reprobed and self.source.startswith("measured"):
            self._reprobed = True
            log.warning("MFU came out at %.0f%% of the %s peak (%.2f TFLOP/s): the peak was under-measured; "
                        "measuring it again", 100 * mfu, self.precision, self.peak / 1e12)
            self.peak, self.source = peak_flops(self.device, self.precision, reprobe=True)
            return self(tokens_per_s)
        self.trusted = False
        log.warning("MFU would be %.0f%% of %s (%.2f TFLOP/s): that peak cannot be right, so MFU is not reported "
                    "for this run; `python scripts/bench.py --probe` measures it again", 100 * mfu, self.source,
                    self.peak / 1e12)
        return None
