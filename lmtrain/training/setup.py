"""The assembly of a run: every part the training loop needs, built from a `TrainConfig` in one written order.

`build_parts` is the one place that knows every part; the loop (lmtrain.training.loop) receives them built.
The order matters, and is this:

 1. the device, and `trainer.resume` checked from its files alone: a wrong step folder fails before any data
    is read;
 2. the world: this process joins the others (when there are several) and gets its own device; the ranks
    compare their resolved configs (a rank started with other overrides stops the run here, in one line); then
    `model.init_from` checked from its files alone, so a wrong checkpoint fails before any data is read
    (an hf:<repo id> is downloaded here, once per node: local rank 0 first, the others find it cached);
 3. the strategy and the number format asked for; TF32 on CUDA; the seed, before anything random is drawn;
    the trackers (logger=..., rank 0), imported and started: a broken install or a missing login stops the
    run here, before any data work;
 4. the data, tokenized once per node (local rank 0 first, the others then find the cache); the ranks compare
    the data's fingerprint (each node's cache and tokenizer);
 5. the model, its vocabulary taken from the tokenizer;
 6. `precision=auto` confirmed on the model's own step, eagerly: before compiling;
 7. the loaders: whole global batches, of which this rank trains on its rows; so the run's length is known;
 8. compiling, block by block (`trainer.compile=auto` measures once per shape whether this run repays it),
    then the parallel wrapper (FSDP2 and HSDP shard the compiled blocks);
 9. the optimizer, over the wrapped (for FSDP2: sharded) parameters;
10. MFU, and metrics.jsonl feeding the loggers, which get the resolved config (metrics' clock starts here,
    just before training); the profiler;
11. the divergence guard, early stopping and the checkpoints: `trainer.resume` restores weights, optimizer,
    loader and the guard's state here (or `model.init_from`'s weights are loaded);
12. micro-batches: a trial step on the bare model (no DDP all-reduce), every rank taking the smallest size.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmtrain.config import ModelConfig, Precision, Strategy, TrainConfig, as_plain_dict
from lmtrain.config.base import flatten
from lmtrain.console import PreparationProgress, wants_progress_bar
from lmtrain.data.loader import TrainLoader, train_loader, val_batches
from lmtrain.data.prepare import prepare_data
from lmtrain.data.tokenizer import TextTokenizer
from lmtrain.distributed import collectives, strategies
from lmtrain.distributed.agreement import check_same
from lmtrain.distributed.strategies import Parallel
from lmtrain.distributed.world import World, pick_device
from lmtrain.distributed.world import setup as join_world
from lmtrain.errors import ConfigError
from lmtrain.model import GPT
from lmtrain.model.generation import encode_prompt
from lmtrain.runs.loggers import build_loggers, call_guarded
from lmtrain.runs.metrics import MetricsLog
from lmtrain.training.compilation import CompileChoice
from lmtrain.training.compilation import choose as choose_compile
from lmtrain.training.debugging import StepProfiler
from lmtrain.training.divergence import DivergenceGuard
from lmtrain.training.early_stopping import EarlyStopping
from lmtrain.training.memory import MicroBatches, configured_size, micro_batches, trial_step
from lmtrain.training.mfu import Mfu
from lmtrain.training.optim import Optimizer, build_optimizer
from lmtrain.training.precision import TrainingPrecision, choose, confirm_on_model, use_tf32
from lmtrain.training.preflight import init_from_checked, resume_checked
from lmtrain.training.state import Checkpointer

# Settings that may differ between ranks: where each node keeps its token cache (the data fingerprint compares
# what is in it)
RANK_LOCAL_KEYS = ("data.cache_dir",)


@dataclass
class Parts:
    """Everything one process's training loop works with, built and ready."""

    cfg: TrainConfig  # as checked: init_from's tokenizer applied
    run_dir: Path
    world: World
    device: torch.device  # this rank's own
    tokenizer: TextTokenizer
    model_cfg: ModelConfig  # cfg.model with vocab_size and vocab_multiple filled in
    model: GPT  # the bare model, what checkpoints save; FSDP2 shards it in place
    precision: TrainingPrecision
    compilation: CompileChoice  # blocks and loss region under torch.compile, and why
    parallel: Parallel  # the forward to call (the model or its DDP wrapper) and DDP's gradient sync
    optimizer: Optimizer
    train_loader: TrainLoader
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]  # fixed validation batches, this rank's rows
    total_steps: int
    mfu: Mfu
    metrics: MetricsLog
    profiler: StepProfiler  # trainer.profile_steps (debug=profile); does nothing when off
    checkpoints: Checkpointer
    divergence: DivergenceGuard
    early_stopping: EarlyStopping  # its state is restored with the loop's counters (Trainer._restore)
    micro: MicroBatches
    sample_prompts: list[list[int]]  # encoded trainer.sample_prompts; empty when sampling is off
    resumed: dict | None = None  # the training state a checkpoint restored (the loop's counters); None: step 0

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step trains on, every rank's together."""
        t = self.cfg.trainer
        return t.batch_size * t.grad_accum_steps * self.model_cfg.block_size * self.world.size


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_parts(cfg: TrainConfig, run_dir: Path) -> Parts:
    """Build every part of a run, in the order the module's docstring gives."""
    t, run_dir = cfg.trainer, Path(run_dir)
    device = pick_device(t.device)  # 1
    vocab_multiple = cfg.model.vocab_multiple or (64 if device.type == "cuda" else 1)
    resume_checked(t.resume)
    group_of_one = t.strategy in (Strategy.ddp, Strategy.fsdp, Strategy.hsdp)  # even with one process
    world, device = join_world(device, t.dist_timeout_s, group_of_one)  # 2
    check_same({k: v for k, v in flatten(as_plain_dict(cfg)).items() if k not in RANK_LOCAL_KEYS}, "configs",
               "Start every rank with the same command line (and the same config files)")
    if cfg.model.init_from is not None:
        with collectives.local_main_first(world):  # one rank per node downloads an hf:<repo id>, then the rest
            cfg = init_from_checked(cfg, vocab_multiple)
    strategy = strategies.resolve(t.strategy, world)  # 3
    choice = choose(t.precision, device)
    use_tf32(device)
    seed_everything(t.seed)
    loggers = build_loggers(cfg.logger, run_dir, as_plain_dict(cfg)) if world.main else []

    with collectives.local_main_first(world), \
            PreparationProgress(wants_progress_bar(t.progress) and world.main) as progress:  # 4
        data = prepare_data(cfg.data, cfg.tokenizer, progress)
    check_same({"data": data.fingerprint()}, "data (the token caches' manifests and tokenizer)",
               "The nodes read different files under the same names, or caches built from them: give every node the "
               "same data (or let one node prepare it on a shared data.cache_dir)")
    tokenizer = data.tokenizer
    if t.eval_screen_batches and data.weights is not None:
        raise ConfigError("trainer.eval_screen_batches needs one data source: a mixture's first validation batches "
                          "are its first source's")
    vocab = cfg.model.vocab_size or tokenizer.vocab_size  # 5
    if vocab < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size}")
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab, vocab_multiple=vocab_multiple)
    model = GPT(model_cfg).to(device)
    model.activation_checkpointing = t.activation_checkpointing
    micro_size = configured_size(t.micro_batch_size, t.batch_size) or t.batch_size  # auto: searched at 12
    if t.precision == Precision.auto:  # 6
        choice = confirm_on_model(choice, model, micro_size, device)
    precision = TrainingPrecision(choice, device)

    block, batch = model_cfg.block_size, t.batch_size * world.size  # 7: the loaders hand out whole global batches
    loader = train_loader(data, block, batch, t.seed, t.num_workers, pin_memory=device.type == "cuda",
                          rows=world.rows(batch), repeat=t.overfit_batches)
    validation = val_batches(data, block, batch, t.eval_batches, world.rows)
    total_steps = t.max_steps or t.epochs * max(1, loader.batches_per_epoch // t.grad_accum_steps)

    passes_per_step = t.grad_accum_steps * t.batch_size // micro_size  # 8
    compilation = choose_compile(t.compile, model, micro_size, total_steps, passes_per_step, device, precision.name,
                                 precision.autocast)
    sharding = strategies.Sharding(t.reshard_after_forward, t.fsdp_param_dtype, t.fsdp_reduce_dtype, t.hsdp_shard_size)
    parallel = strategies.wrap(model, strategy, device, precision.name == "bf16", world, sharding)
    optimizer = build_optimizer(model, cfg.optimizer, device.type)  # 9

    # 10. MFU per device: every rank's tokens/s over all devices' peak, i.e. each rank's share of the FLOPs
    mfu = Mfu(device, precision.name, model.flops_per_token() / world.size)
    saved_config = as_plain_dict(dataclasses.replace(cfg, model=model_cfg))  # the resolved config checkpoints hold
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=world.main, loggers=loggers)
    call_guarded(loggers, lambda logger: logger.start(saved_config))
    profiler = StepProfiler(t.profile_steps if world.main else 0, run_dir, device)
    # Encoded only when sampling is on: a char tokenizer may lack the default prompts' characters.
    prompts = [encode_prompt(tokenizer, p, "trainer.sample_prompts") for p in (t.sample_prompts if t.sample_every
                                                                               else [])]

    divergence = DivergenceGuard(t, device, loss_scaling=precision.scaler is not None)  # 11
    early_stopping = EarlyStopping(t.early_stopping, t.target_val_loss)
    checkpoints = Checkpointer(run_dir, t.keep_last, saved_config, tokenizer, world, parallel.sharded)
    resumed = checkpoints.start(t.resume, cfg.model.init_from, model, optimizer, loader)
    if resumed is not None:
        divergence.load_state_dict(resumed)

    micro = micro_batches(t.micro_batch_size, t.batch_size, device, trial_step(  # 12
        model, model, tokenizer.vocab_size, block, device, precision.autocast), world)
    micro.size = collectives.smallest(micro.size, device)  # every rank runs as many micro-batches
    return Parts(cfg, run_dir, world, device, tokenizer, model_cfg, model, precision, compilation, parallel, optimizer,
                 loader, validation, total_steps, mfu, metrics, profiler, checkpoints, divergence, early_stopping,
                 micro, prompts, resumed)
