"""What the debug presets (configs/debug/) add to a run: a resume tried in the run itself, the overfit verdict,
and a profiler trace of a few steps.

- `check_resume` (trainer.resume_check, debug=fast): a step checkpoint just saved is read back from disk as
  `trainer.resume` reads one, compared with the live weights, optimizer state and loader position, and applied:
  the run goes on from it, so a config that cannot resume exactly fails in seconds, not after hours.
- `overfit_verdict` (trainer.overfit_batches, debug=overfit): PASS when the training loss on the repeated
  batches fell below OVERFIT_PASS_LOSS, else FAIL, in one line.
- `StepProfiler` (trainer.profile_steps, debug=profile): torch.profiler over a few steps after two warm-up steps;
  RUN/profile/trace.json (chrome://tracing or ui.perfetto.dev) and top_ops.txt, the table it logs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from lmtrain.data.loader import TrainLoader
from lmtrain.errors import CheckpointError
from lmtrain.model.weights import model_tensors
from lmtrain.training.state import TrainingCheckpoint, optimizer_state

log = logging.getLogger(__name__)

OVERFIT_PASS_LOSS = 0.05  # nats per token: a model that memorized its batches is below this
TOP_OPS = 15  # rows of the profiler's table


def _differing(saved: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k in saved.keys() | live.keys() if k not in saved or k not in live
                  or saved[k].shape != live[k].shape or not torch.equal(saved[k], live[k]))


def check_resume(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, loader: TrainLoader,
                 rank: int = 0) -> TrainingCheckpoint:
    """Read a step checkpoint back, check that it holds the live training state, and resume from it."""
    checkpoint = TrainingCheckpoint.read(folder, rank)
    if checkpoint.weights is None:  # FSDP2 shards: read back by `apply`, not compared here
        checkpoint.apply(model, optimizer, loader, sharded=True, rank=rank)
        return checkpoint
    problems = [f"{what}: {', '.join(names[:5])}" for what, names in [
        ("weights", _differing(checkpoint.weights, model_tensors(model))),
        ("optimizer state", _differing(checkpoint.optimizer[0], optimizer_state(optimizer)[0]))] if names]
    if checkpoint.state["loader"] != loader.state_dict():
        problems.append(f"loader position {checkpoint.state['loader']} != {loader.state_dict()}")
    if problems:
        raise CheckpointError(f"resume check: {folder} does not hold the run's state, so a resume would not continue "
                              f"exactly; it differs in {'; '.join(problems)}")
    checkpoint.apply(model, optimizer, loader, sharded=False, rank=rank)
    log.info("Resume check: %s, read back from disk, holds the live weights, optimizer state and loader position; "
             "training goes on from it", folder.name)
    return checkpoint


def overfit_verdict(batches: int, steps: int, final_loss: float) -> tuple[bool, str]:
    """Whether the run memorized its `batches` repeated batches, and the line that says so."""
    passed = final_loss < OVERFIT_PASS_LOSS
    what = f"the training loss on {batches} repeated batch{'es' if batches > 1 else ''} is {final_loss:.4f} after " \
           f"{steps} steps"
    if passed:
        return True, f"Overfit check PASSED: {what}, below {OVERFIT_PASS_LOSS}"
    return False, (f"Overfit check FAILED: {what}, not below {OVERFIT_PASS_LOSS}: the model does not memorize them. "
                   "Train longer (trainer.max_steps), or look at optimizer.lr, the model and the data")


class StepProfiler:
    """Call `step()` after each optimizer step; `close()` when training ends. Off (free) with steps = 0."""

    def __init__(self, steps: int, run_dir: Path, device: torch.device):
        self.steps, self.folder, self.device = steps, Path(run_dir) / "profile", device
        self.profiler: torch.profiler.profile | None = None
        self.done = steps == 0

    def step(self) -> None:
        if self.done:
            return
        if self.profiler is None:  # after the first step: compiling and allocator warm-up stay out
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(
                activities=activities, on_trace_ready=self._write,
                schedule=torch.profiler.schedule(wait=0, warmup=1, active=self.steps, repeat=1))
            self.profiler.start()
            return
        self.profiler.step()

    def _write(self, profiler: torch.profiler.profile) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(self.folder / "trace.json"))
        sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort, row_limit=TOP_OPS)
        (self.folder / "top_ops.txt").write_text(table + "\n")
        log.info("Profile of %d steps, by %s (all of it in %s):\n%s", self.steps, sort, self.folder, table)
        self.done = True

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            if not self.done:
                log.warning("trainer.profile_steps=%d: the run ended before the profiled steps did; no trace",
                            self.steps)
            self.profiler, self.done = None, True
