"""What a run reports: metrics.jsonl records, throughput, model FLOPs utilization, and the final table."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
from rich.table import Table
from rich.text import Text

# Dense peak TFLOP/s per GPU, as (bf16, tf32), from the vendors' data sheets (without sparsity).
GPU_PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "B200": (2250.0, 1100.0),
    "H200": (989.0, 494.0),
    "H100 SXM": (989.0, 494.0),
    "H100 NVL": (835.0, 418.0),
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.0, 494.0),
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "L4": (121.0, 60.0),
    "A10G": (70.0, 35.0),
    "A10": (125.0, 62.5),
    "RTX 6000 Ada": (364.0, 182.0),
    "RTX A6000": (155.0, 77.0),
    "RTX 4090": (165.0, 82.6),
    "RTX 3090": (71.0, 35.6),
    "V100": (125.0, 15.7),  # no bf16: its fp16 tensor-core peak
    "T4": (65.0, 8.1),
}


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl, flushed at once so a crash loses nothing logged.

    Every record gets `elapsed_s`: wall-clock seconds since the log was opened, which the trainer does as
    its setup ends, just before the first step (a resumed run counts from its restart). Time-to-target
    figures, such as a speedrun's, are read from it.
    """

    def __init__(self, path: Path, enabled: bool = True, loggers: list | None = None):
        self.path, self.enabled = path, enabled
        self._file = open(path, "a", encoding="utf-8") if enabled else None
        self._start = time.perf_counter()
        self.loggers = loggers or []  # lmtrain.loggers.RunLogger: each gets every record once it is written

    def write(self, record: dict) -> None:
        if self._file is not None:
            record = {**record, "elapsed_s": round(time.perf_counter() - self._start, 3)}
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            for logger in self.loggers:
                logger.log(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            for logger in self.loggers:
                logger.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def recorded_figures(path: Path) -> tuple[float, float]:
    """A run's last training loss and its training tokens/s over all its logged steps, from its metrics.jsonl:
    what a resumed run that had nothing left to train reports. (nan, 0.0) when there is no training record."""
    records = [r for r in read_metrics(path) if "loss" in r and r.get("tokens_per_s")] if path.exists() else []
    if not records:
        return float("nan"), 0.0
    tokens = [r["tokens"] for r in records]  # cumulative; each record's rate covers those since the one before
    seconds = sum((now - before) / r["tokens_per_s"] for r, now, before in zip(records, tokens, [0, *tokens[:-1]],
                                                                                 strict=True))
    return records[-1]["loss"], tokens[-1] / seconds


def rewind(path: Path, size: int) -> int:
    """Cut a metrics file back to its first `size` bytes (its length when a checkpoint was saved), so a
    resumed run continues it without repeating steps; returns how many records were dropped."""
    if not path.exists() or path.stat().st_size <= size:
        return 0
    with open(path, "rb+") as f:
        f.seek(size)
        dropped = f.read().count(b"\n")
        f.truncate(size)  # one system call: a crash leaves the file whole or cut, never half-cut
    return dropped


class Throughput:
    """Training tokens per second over the steps since the last call to `rate`."""

    def __init__(self):
        self._tokens, self._start = 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self._tokens / max(now - self._start, 1e-9)
        self._tokens, self._start = 0, now
        return rate

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (an evaluation, say) does not count as training time."""
        start = time.perf_counter()
        yield
        self._start += time.perf_counter() - start


def gpu_peak_flops(device_name: str, bf16: bool) -> float | None:
    """The data-sheet peak for a known GPU name (longest matching entry wins), else None."""
    matches = [k for k in GPU_PEAK_TFLOPS if k.lower() in device_name.lower()]
    if not matches:
        return None
    bf16_peak, tf32_peak = GPU_PEAK_TFLOPS[max(matches, key=len)]
    return (bf16_peak if bf16 else tf32_peak) * 1e12


@cache
def measured_peak_flops(device: str, dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """A device's matmul rate, measured by a short probe: the peak for MFU where no data sheet applies."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * size**3 * done / (time.perf_counter() - start)


def peak_flops(device: torch.device, bf16: bool) -> tuple[float, str]:
    """The peak to measure MFU against, and where it came from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, bf16)
        if peak is not None:
            return peak, f"{name} data sheet"
    dtype = torch.bfloat16 if bf16 else torch.float32
    return measured_peak_flops(str(device), dtype), f"measured {str(dtype).removeprefix('torch.')} matmul"


def summary_table(rows: list[tuple[str, str]]) -> Table:
    table = Table(title="Training summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # a long path wraps on a narrow terminal instead of ending in "…"
    for key, value in rows:
        table.add_row(Text(key), Text(value))  # plain text: a path such as files=[/x] is not markup
    return table
