"""Model FLOPs utilization: the device's peak for the run's precision, and MFU figures that can be trusted.

The peak comes from the vendor's data sheet for a known GPU, matched by its exact device name ("NVIDIA L40"
is not the L4 and not the L40S). Elsewhere (a CPU, an unknown GPU) it is measured: the best of several
repeats of a matmul large enough to be compute-bound, synchronized on a GPU. It is kept per machine,
precision, thread count and torch version in lmtrain's cache folder (`LMTRAIN_CACHE`, default
~/.cache/lmtrain) as peak_flops.json; `scripts/bench.py --probe` measures again.

A CPU shared with other work makes a probe read low, and an MFU against it read high. So each timing also
takes this process's CPU time: a timing in which its threads got less than CLEAN_CPU_SHARE of the wall time
(other processes held the cores) is contended. The cache keeps the best reading ever made, never a lower
one (other work only slows a matmul down), and whether a clean one is among them; until one is, every run
measures again (a few attempts, about a second each) and warns. An MFU above 100% still re-measures the
peak once, with a warning, and one still above 100% is never reported.

Why measured and not a data sheet on a CPU: what torch's kernels reach depends on the library as much as on
the chip. On the developers' AMD EPYC (AVX-512) MKL's fp32 matmul runs AVX2 kernels at about half of what
the instruction set allows, while oneDNN's bf16 matmul uses AVX512-BF16: cores x clock x FLOPs per cycle
would put fp32 MFU at half of what the same code reaches, and say nothing of which library runs.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from lmtrain.distributed.world import cpu_count
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
CLEAN_CPU_SHARE = 0.9  # a CPU timing counts as uncontended when the process got this share of its threads' time
PROBE_ATTEMPTS = 3  # probes per run, at most, looking for an uncontended timing


@dataclass(frozen=True)
class PeakReading:
    """A measured matmul peak: FLOP/s, and the share of its threads' wall time the process got (1 on a GPU)."""

    flops: float
    cpu_share: float = 1.0

    @property
    def clean(self) -> bool:
        return self.cpu_share >= CLEAN_CPU_SHARE

    def as_json(self) -> dict:
        return {"flops": self.flops, "cpu_share": round(self.cpu_share, 3)}

    @staticmethod
    def from_json(value: object) -> PeakReading | None:
        """A stored reading; a bare number (an older lmtrain's cache) is one of unknown contention."""
        if isinstance(value, (int, float)) and value > 0:
            return PeakReading(float(value), 0.0)
        if isinstance(value, dict) and isinstance(value.get("flops"), (int, float)) and value["flops"] > 0:
            return PeakReading(float(value["flops"]), float(value.get("cpu_share", 0.0)))
        return None


def best_reading(timings: list[tuple[float, float]]) -> PeakReading:
    """From (FLOP/s, CPU share) timings: the fastest uncontended one, or, with none, the fastest of all."""
    clean = [t for t in timings if t[1] >= CLEAN_CPU_SHARE]
    return PeakReading(*max(clean or timings))


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


def probe_peak_flops(device: torch.device, precision: str, repeats: int = 5, min_seconds: float = 0.15) -> PeakReading:
    """The best matmul rate over `repeats` timings, each at least `min_seconds` long, and how contended it was.

    The size keeps the matmul compute-bound: 8192 on a GPU (4096 in fp32), where a smaller one is limited by
    kernel launches; on a CPU 2048, or less where a precision is emulated and a 512 matmul already takes
    long (fp16 on most CPUs: a 2048 one could take a minute). Best of several, because other work on the
    machine only slows it; on a CPU each timing also reads the process's CPU time (see best_reading).
    """
    if device.type == "cuda":
        size = 4096 if precision == "fp32" else 8192
    else:
        size = min(2048, max(256, int(512 * (0.05 / _matmul_seconds(device, precision, 512)) ** (1 / 3))))
    a, b = _random_matrices(device, precision, size)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    threads = min(torch.get_num_threads(), cpu_count())
    a @ b  # warm-up: kernel selection, thread pool start
    sync()
    timings = []
    for _ in range(repeats):
        done, start, cpu_start = 0, time.perf_counter(), time.process_time()
        while True:
            for _ in range(1 if device.type == "cpu" else 10):
                a @ b
                done += 1
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        share = 1.0 if device.type == "cuda" else (time.process_time() - cpu_start) / (elapsed * threads)
        timings.append((2 * size**3 * done / elapsed, min(share, 1.0)))
    return best_reading(timings)


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


_PROBED_HERE: dict[tuple[Path, str], PeakReading] = {}  # (cache, machine_key) -> this process's probe


def measured_peak(device: torch.device, precision: str, reprobe: bool = False) -> PeakReading:
    """This machine's measured peak for `precision`: the cached reading when it is uncontended (and not
    `reprobe`); otherwise probed again (up to PROBE_ATTEMPTS times, until a timing is uncontended), once per
    process, and the best of the new and the cached readings stored: a busy moment never lowers the peak."""
    path, key = cache_file(), machine_key(device, precision)
    if (path, key) in _PROBED_HERE and not reprobe:  # the precision choice, compile=auto and MFU all ask
        return _PROBED_HERE[path, key]
    cached = PeakReading.from_json(_read_json(path).get(key))
    if cached is not None and cached.clean and not reprobe:
        return cached
    log.info("Measuring this machine's %s matmul peak for MFU (cached in %s)", precision, path)
    probed: list[PeakReading] = []
    for _ in range(PROBE_ATTEMPTS):
        probed.append(probe_peak_flops(device, precision))
        if probed[-1].clean:
            break
    readings = probed + ([] if cached is None else [cached])
    best = max(readings, key=lambda r: r.flops)
    if not best.clean and any(r.clean for r in readings):  # the fastest was contended; a clean one exists
        best = PeakReading(best.flops, max(r.cpu_share for r in readings))
    if not best.clean:
        log.warning("The machine was busy while measuring the %s matmul peak (this process got at most %.0f%% of "
                    "its threads' time): MFU may read high until a quieter run measures it again", precision,
                    100 * max(r.cpu_share for r in probed))
    _write_json(path, key, best.as_json(), f"{precision} matmul peak")
    _PROBED_HERE[path, key] = best
    return best


def _read_json(path: Path) -> dict:
    try:
        cached = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def _write_json(path: Path, key: str, value: object, what: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {**_read_json(path), key: value})
    except OSError as e:
        log.warning("Could not cache the measured %s in %s: %s", what, path, e)


def _positive(value: object) -> bool:
    if isinstance(value, dict):
        return bool(value) and all(_positive(v) for v in value.values())
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def cached_measurement(path: Path, key: str, measure: Callable[[], object], what: str, remeasure: bool = False):
    """The figure stored under `key` in the JSON file `path` (a positive number, or a dict of them), or, when
    absent (or `remeasure`), the result of `measure()`, stored there for next time. An unreadable file is
    measured again and rewritten."""
    cached = _read_json(path).get(key)
    if not remeasure and _positive(cached):
        return cached
    log.info("Measuring this machine's %s (once; cached in %s)", what, path)
    figure = measure()
    _write_json(path, key, figure, what)
    return figure


def peak_flops(device: torch.device, precision: str, reprobe: bool = False) -> tuple[float, str]:
    """The peak FLOP/s to measure MFU against, and where it came from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, precision)
        if peak is not None:
            return peak, f"{name} data sheet, {precision}"
    reading = measured_peak(device, precision, reprobe)
    busy = "" if reading.clean else f", under load ({100 * reading.cpu_share:.0f}% of the CPU)"
    return reading.flops, f"measured {precision} matmul{busy}"


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
