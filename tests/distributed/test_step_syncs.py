"""Two gloo processes: the per-step agreement reads the stop flags one step late and every rank stops after the
same step; a training step that logs nothing reads nothing back from the device (no `.item()`, `float()`,
`bool()`, `.tolist()` on a tensor, no `torch.cuda.synchronize`), counted with those patched on each rank."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, make_trainer

pytestmark = pytest.mark.slow

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")  # each reads a value to the host


def join(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")


def agreement_worker(rank: int, port: int, out: Path) -> None:
    import torch.distributed as dist

    from lmtrain.distributed.collectives import StepAgreement

    join(rank, port)
    dist.init_process_group("gloo")
    agree, seen = StepAgreement(torch.device("cpu")), []
    for step in range(1, 7):
        received = signal.SIGINT if rank == 1 and step >= 3 else None  # rank 1 is signalled during step 3
        if rank == 0 and step >= 5:
            received = signal.SIGTERM  # and rank 0 during step 5, with a larger number
        loss, stop = agree(torch.tensor(float(rank + step)), received)
        seen.append([float(loss), stop.name if stop else None])
    dist.destroy_process_group()
    (out / str(rank)).write_text(json.dumps(seen))


def from_data_loader(frame) -> bool:
    """Whether torch's DataLoader is on the stack: it draws each epoch's base seed as a host tensor, which a
    CPU-only test cannot tell apart from a device read by the tensor's device."""
    while frame is not None:
        if f"torch{os.sep}utils{os.sep}data{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def training_worker(rank: int, port: int, run_dir: Path, out: Path) -> None:
    join(rank, port)
    trainer = make_trainer(run_dir, "trainer.max_steps=12", "trainer.log_every=4", "trainer.eval_every=100",
                           "trainer.batch_size=4", "trainer.precision=fp32")
    current = {"step": 0}
    reads: list[list] = []

    def counting(name, original):
        def read(*args, **kwargs):
            if not from_data_loader(sys._getframe(1)):
                reads.append([current["step"], name])
            return original(*args, **kwargs)
        return read

    for name in READS:
        setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    torch.cuda.synchronize = counting("cuda.synchronize", torch.cuda.synchronize)
    set_lr = trainer._set_lr

    def step_starts():  # the first call of each optimizer step
        current["step"] = trainer.step + 1
        return set_lr()

    trainer._set_lr = step_starts
    trainer.fit()
    report = {"reads": reads, "batches_per_epoch": trainer.train_loader.batches_per_epoch}
    (out / str(rank)).write_text(json.dumps(report))


def spawn(target, *args) -> None:
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=target, args=(rank, *args)) for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0


def test_every_rank_learns_of_a_stop_one_step_later_and_the_largest_signal_wins(tmp_path):
    spawn(agreement_worker, free_port(), tmp_path)
    for rank in range(2):
        seen = json.loads((tmp_path / str(rank)).read_text())
        assert [loss for loss, _ in seen] == [1.5, 2.5, 3.5, 4.5, 5.5, 6.5]  # the mean of rank + step over 2 ranks
        assert [stop for _, stop in seen] == [None, None, None, "SIGINT", "SIGINT", "SIGTERM"], rank


def test_a_two_rank_run_reads_nothing_from_the_device_outside_logging_steps(tmp_path):
    spawn(training_worker, free_port(), tmp_path / "run", tmp_path)
    for rank in range(2):
        report = json.loads((tmp_path / str(rank)).read_text())
        assert report["batches_per_epoch"] > 12  # no epoch ends (its average loss is read then)
        by_step: dict[int, list[str]] = {}
        for step, name in report["reads"]:
            by_step.setdefault(step, []).append(name)
        quiet = [s for s in range(1, 13) if s % 4 != 0]
        assert {s: by_step[s] for s in quiet if s in by_step} == {}, rank
        assert all("item" in by_step.get(s, []) for s in (4, 8, 12)), rank  # the counting sees the logged reads
