"""Micro-batches that fit: halving after an out-of-memory error keeps the training the same; batches reach
the device contiguous; per-block compilation compiles once for training and once for evaluation."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from lmtrain.config import register_configs, to_train_config
from lmtrain.errors import ConfigError
from lmtrain.runs.metrics import read_metrics
from lmtrain.training.memory import MicroBatches, OutOfMemory, next_smaller

from conftest import free_port, make_trainer

register_configs()


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_sizes_halve_through_divisors_of_the_batch():
    assert [next_smaller(s, 12) for s in (12, 6, 3, 1)] == [6, 3, 1, None]
    assert [next_smaller(s, 14) for s in (14, 7, 2)] == [7, 2, 1]


SHORT = ["trainer.max_steps=6", "trainer.grad_accum_steps=2", "scheduler.warmup_steps=0"]  # full LR: steps matter


def test_an_out_of_memory_step_halves_the_micro_batch_and_trains_as_a_run_started_there(tmp_path):
    oom_step = 3
    trainer = make_trainer(tmp_path / "oom", *SHORT)
    real_forward, calls = trainer.forward, []

    def forward(x, y):
        # a test hook standing in for the allocator: at step 3 the second micro-batch of 8 runs out of memory,
        # after the first one's gradients were accumulated (the retry must drop them)
        if trainer.step + 1 == oom_step and x.shape[0] == 8:
            calls.append(x.shape[0])
            if len(calls) == 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(x, y)

    trainer.forward = forward
    trainer.fit()
    assert calls == [8, 8] and trainer.micro.size == 4

    make_trainer(tmp_path / "from4", *SHORT, "trainer.micro_batch_size=4").fit()
    halved, from4 = train_losses(tmp_path / "oom"), train_losses(tmp_path / "from4")
    assert list(halved) == list(from4) == [1, 2, 3, 4, 5, 6]
    for step in halved:  # accumulation order changes float sums, nothing else
        assert halved[step] == pytest.approx(from4[step], rel=1e-6), step  # seen: <= 5e-7; stale gradients: 4e-4
    records = [r for r in read_metrics(tmp_path / "oom" / "metrics.jsonl") if "loss" in r]
    assert [r["micro_batch_size"] for r in records] == [8, 8, 4, 4, 4, 4]
    assert records[-1]["tokens"] == 6 * 2 * 8 * 16  # the global batch did not shrink


def test_out_of_memory_at_one_sequence_is_a_clear_error():
    batcher = MicroBatches(batch_size=4, size=4, device=torch.device("cpu"))
    sizes = []

    def step(micro):
        sizes.append(micro[0][0].shape[0])
        raise torch.OutOfMemoryError("simulated")

    params = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(OutOfMemory, match="trainer.micro_batch_size=1"):
        batcher.run(step, [(torch.zeros(4, 3), torch.zeros(4, 3))], torch.optim.SGD(params, lr=0.1), at_step=0)
    assert sizes == [4, 2, 1]


def test_micro_batch_size_must_divide_the_batch():
    with initialize_config_module(config_module="lmtrain.configs", version_base="1.3"):
        bad = compose(config_name="train", overrides=["trainer.batch_size=8", "trainer.micro_batch_size=3"])
        auto = compose(config_name="train", overrides=["trainer.micro_batch_size=auto"])
    with pytest.raises(ConfigError, match="trainer.micro_batch_size=3 must be auto or a number"):
        to_train_config(bad)
    assert to_train_config(auto).trainer.micro_batch_size == "auto"


def test_batches_reach_the_device_contiguous_and_auto_means_the_batch_on_cpu(tmp_path):
    trainer = make_trainer(tmp_path, "trainer.max_steps=3", "trainer.eval_every=2", "trainer.micro_batch_size=auto")
    assert trainer.micro.size == 8  # the start-up search runs on CUDA only
    seen = []
    trainer.model.register_forward_pre_hook(lambda module, args: seen.append([a.is_contiguous() for a in args]))
    trainer.micro.size = 4  # micro-batches are row slices of the loaded batch
    trainer.fit()
    assert len(seen) == 3 * 2 + 2 * 2 * 2  # 3 steps, 2 evaluations of 2 batches; 2 micro-batches each
    assert all(all(flags) and len(flags) == 2 for flags in seen)


def test_regional_compilation_has_one_graph_per_region_for_training_and_one_for_evaluation(tmp_path, monkeypatch):
    # Dynamo's guards, and so its recompiles, do not depend on the backend; aot_eager spares the test the
    # minute of C++ code generation inductor needs on a small CPU.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    trainer = make_trainer(tmp_path, "trainer.max_steps=20", "trainer.eval_every=10", "trainer.compile=true",
                           "trainer.log_every=5")
    trainer.fit()
    assert len([r for r in read_metrics(tmp_path / "metrics.jsonl") if "val_loss" in r]) == 2
    # both blocks share one frame, the loss region (final norm, head, loss) is another; each compiled twice:
    # training (grad mode) and evaluation (no_grad, eval mode), and never again over 20 steps
    assert counters["frames"]["total"] == 4 and counters["stats"]["unique_graphs"] == 4, dict(counters["frames"])


def test_auto_search_keeps_the_largest_size_that_fits():
    batcher = MicroBatches(batch_size=24, size=24, device=torch.device("cpu"))
    tried = []

    def trial(size):
        tried.append(size)
        if size > 5:
            raise torch.OutOfMemoryError("simulated")

    batcher.fit(trial)
    assert tried == [24, 12, 6, 3] and batcher.size == 3


def _oom_on_rank_1(rank: int, port: int, results) -> None:
    """One rank of a 2-process DDP step: rank 1's first forward runs out of memory (simulated)."""
    import datetime
    import os

    import torch.distributed as dist

    from lmtrain.distributed.ranks import World

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=10))
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))
    batcher = MicroBatches(batch_size=4, size=4, device=torch.device("cpu"), world=World(rank=rank, size=2))
    calls = []

    def step(micro):
        calls.append(micro[0][0].shape[0])
        if rank == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        loss = sum(model(x).sum() for x, _ in micro)
        loss.backward()  # DDP's all-reduce: waits for rank 1's gradients, which never come
        return loss.detach()

    try:
        batcher.run(step, [(torch.ones(4, 3), torch.ones(4, 1))], torch.optim.SGD(model.parameters(), lr=0.1), 6)
        results.put((rank, calls, "no error"))
    except Exception as e:  # rank 1: OutOfMemory; rank 0: the collective its peer left
        results.put((rank, calls, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_out_of_memory_under_two_ddp_ranks_stops_the_run_instead_of_retrying_on_one_rank():
    """Halving the micro-batch on the rank that ran out of memory alone would redo the step's DDP all-reduce on that
    rank only (the other is already waiting inside it): the step stops at once instead, saying what to resume with."""
    import torch.multiprocessing as mp

    port = free_port()
    context = mp.get_context("spawn")
    results = context.Queue()
    mp.start_processes(_oom_on_rank_1, args=(port, results), nprocs=2, start_method="spawn")
    got = {rank: (calls, error) for rank, calls, error in (results.get(timeout=60) for _ in range(2))}
    calls, error = got[1]
    assert calls == [4]  # never retried with micro-batch 2 on its own
    assert error.startswith("OutOfMemory: rank 1 ran out of memory in step 7 at micro-batch 4; under 2 processes")
    assert "trainer.resume=auto trainer.micro_batch_size=2" in error
    assert got[0][0] == [4] and got[0][1] != "no error"  # rank 0's all-reduce fails once rank 1 has left
