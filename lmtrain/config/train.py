"""`lmtrain train`'s schema: optimizer, scheduler and trainer, composed with model, data and tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import ClassVar

from omegaconf import DictConfig

from lmtrain.config.base import CHECKS, check, check_device, to_config
from lmtrain.config.data import DataConfig, TokenizerConfig, validate_data, validate_tokenizer
from lmtrain.config.logger import LoggerConfig, validate_logger
from lmtrain.config.model import HUB_PREFIX, ModelConfig, PosEmb, validate_rope_scaling


class OptimizerName(str, Enum):
    adamw = "adamw"
    muon = "muon"  # Muon for the 2-D hidden weight matrices, AdamW for embeddings, head, norms and biases


class MuonLrAdjust(str, Enum):
    original = "original"  # Keller Jordan's: the step times sqrt(max(1, rows / cols))
    match_rms_adamw = "match_rms_adamw"  # Moonshot's: 0.2 * sqrt(max(rows, cols)), an update as large as AdamW's


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 3e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.01  # decoupled weight decay; never applied to biases, norms, embeddings
    fused: bool | None = None  # fused AdamW kernel; None: on for CUDA and CPU, off otherwise
    embedding_lr: float | None = None  # peak LR of token and position embeddings; None: lr
    head_lr: float | None = None  # peak LR of an untied LM head (model.tie_embeddings=false); None: lr
    # optimizer=muon only: Muon (torch.optim.Muon) takes the 2-D weight matrices inside the blocks
    muon_lr: float = 0.02  # Muon's peak LR; the schedule scales it as it scales lr
    muon_weight_decay: float = 0.0  # Muon's decoupled weight decay, as a fraction of the weight per unit LR
    muon_momentum: float = 0.95  # Muon's momentum (an exponential moving average of gradients)
    muon_nesterov: bool = True  # Nesterov momentum
    muon_ns_steps: int = 5  # Newton-Schulz iterations that orthogonalize each update
    muon_adjust_lr: MuonLrAdjust = MuonLrAdjust.original  # how each matrix's shape scales Muon's step


class SchedulerName(str, Enum):
    cosine = "cosine"
    constant = "constant"
    linear = "linear"
    wsd = "wsd"  # warm-up, stable at the peak, then a linear decay over the last decay_fraction of the steps


@dataclass
class SchedulerConfig:
    name: SchedulerName = SchedulerName.cosine
    warmup_steps: int = 100  # linear warm-up from 0 to optimizer.lr, in optimizer steps (each model preset sets it)
    # warm-up as a share of all optimizer steps; when set it replaces warmup_steps (a model preset's included);
    # giving both on one command line is refused
    warmup_fraction: float | None = None
    min_lr_ratio: float = 0.1  # final LR as a fraction of optimizer.lr (cosine, linear, wsd)
    decay_fraction: float = 0.2  # wsd: the share of all optimizer steps, at the end, that decays the LR



class Objective(str, Enum):
    """What `lmtrain train` returns to a sweeper (Optuna minimizes it) and sorts a sweep's summary by."""

    val_loss = "val_loss"  # the final validation loss
    best_val_loss = "best_val_loss"  # the lowest validation loss of any evaluation


class Precision(str, Enum):
    auto = "auto"  # CUDA: bf16 at compute capability >= 8.0, else fp16; CPU: bf16 only where native and faster
    fp32 = "fp32"
    bf16 = "bf16"  # bf16 autocast; weights and optimizer state stay fp32
    fp16 = "fp16"  # fp16 autocast with loss scaling (GradScaler) in training; weights stay fp32


class Strategy(str, Enum):
    auto = "auto"  # single for one process, ddp for several
    single = "single"  # one process, one device
    ddp = "ddp"  # DistributedDataParallel: a whole copy of the model per rank, gradients averaged
    fsdp = "fsdp"  # FSDP2: parameters, gradients and optimizer state sharded over the ranks
    hsdp = "hsdp"  # FSDP2 within groups of trainer.hsdp_shard_size ranks (a node), the groups replicas of each other


class FsdpDtype(str, Enum):
    """A dtype of FSDP2's mixed-precision policy (trainer.fsdp_param_dtype, trainer.fsdp_reduce_dtype)."""

    auto = "auto"  # the choice trainer.precision implies (see the fields)
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class DivergenceAction(str, Enum):
    rollback = "rollback"  # restore the newest finite checkpoint, skip the diverged batches, go on
    stop = "stop"  # stop with exit code 3


@dataclass
class EarlyStoppingConfig:
    patience: int = 0  # evaluations in a row without a better validation loss that stop the run; 0: never
    min_delta: float = 0.0  # a better validation loss must be lower than the best by more than this


@dataclass
class TrainerConfig:
    max_steps: int = 600  # optimizer steps; 0: train for `epochs` instead
    epochs: int = 0  # full passes over the training tokens; used when max_steps is 0
    batch_size: int = 32  # sequences per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    log_every: int = 10  # optimizer steps between log lines
    eval_every: int = 100  # optimizer steps between validation passes (and one at the end)
    eval_batches: int = 20  # micro-batches per validation pass
    # a speedrun's target: training ends after the first validation pass (all eval_batches) at or below it
    target_val_loss: float | None = None
    # with target_val_loss: each periodic validation first scores this many of the eval_batches (a fixed random
    # subset of the windows), and the whole pass follows only when they read at most the target plus
    # eval_screen_margin; 0: every pass is whole. Whether the target is reached is always decided on the whole pass
    eval_screen_batches: int = 0
    eval_screen_margin: float = 0.05  # nats above target_val_loss at which a screening pass calls for the whole one
    device: str = "auto"  # auto: cuda if available, else cpu; or cpu, cuda, cuda:1, ...
    precision: Precision = Precision.auto  # auto, fp32, bf16 or fp16 (training/precision.py: what auto picks)
    # torch.compile the blocks and the loss region: true, false, or auto: on where this run is long enough to
    # repay the compile time at the speed-up measured for this machine, precision and shape (cached)
    compile: str = "auto"
    activation_checkpointing: bool = False  # recompute each block in the backward pass: less memory, more compute
    seed: int = 1337  # seeds data order, initialisation and dropout
    num_workers: int = 0  # data loader worker processes; 0 loads in the training process
    progress: bool | None = None  # live progress bar; None: only when stdout is a terminal
    save_every: int = 200  # optimizer steps between checkpoints in checkpoints/step_N/; 0: only at the end
    keep_last: int = 3  # step checkpoints kept, newest first; older ones are deleted; 0 keeps them all
    resume: str | None = None  # None: start fresh; auto: continue this run dir's latest checkpoint; or a step folder
    sample_every: int = 0  # optimizer steps between text samples in the log and metrics.jsonl; 0 disables
    sample_prompts: list[str] = field(default_factory=lambda: [""])  # prompts to continue; "" starts a document
    sample_tokens: int = 64  # most new tokens per sample
    # sequences per forward pass: a divisor of batch_size; auto: the largest that fits (searched on CUDA);
    # None: batch_size. A step that runs out of memory halves it, keeping the global batch.
    micro_batch_size: str | None = None
    objective: Objective = Objective.val_loss  # the figure a sweep optimizes and its summary ranks by
    nproc_per_node: str = "1"  # worker processes this command starts on this node; auto: one per visible GPU
    strategy: Strategy = Strategy.auto
    max_restarts: int = 0  # times trainer.nproc_per_node's launcher restarts all workers (from the last checkpoint)
    dist_timeout_s: float = 300.0  # seconds any collective waits for the other ranks before the run fails
    # FSDP2 and HSDP (trainer.strategy=fsdp or hsdp):
    reshard_after_forward: bool = True  # free each block's gathered weights after its forward (regathered for the
    # backward): less memory for one more all-gather per block; false keeps them until the backward
    fsdp_param_dtype: FsdpDtype = FsdpDtype.auto  # dtype the sharded blocks compute in; auto: bf16 on CUDA when
    # trainer.precision is bf16, else the weights' own (fp32); the sharded weights and optimizer state stay fp32
    fsdp_reduce_dtype: FsdpDtype = FsdpDtype.auto  # dtype gradients are reduce-scattered in; auto: fp32
    hsdp_shard_size: int = 0  # HSDP: ranks that shard one replica of the model; 0: the ranks of one node
    allow_batch_change: bool = False  # resume a checkpoint at another global batch (sequences per optimizer step,
    # all ranks together) than it trained with; refused by default: the data position and the tokens assume it
    on_divergence: DivergenceAction = DivergenceAction.rollback  # on a non-finite loss or gradient norm
    max_rollbacks: int = 3  # rollbacks before a diverging run stops with exit code 3
    rollback_lr_scale: float = 1.0  # factor on the learning rate after each rollback; 1 keeps it
    overwrite: bool = False  # a fresh run may replace the checkpoints and metrics of an earlier run in its folder
    # stop when the validation loss stops improving (trainer.early_stopping.patience=3): a completed run, exit 0
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # debugging (configs/debug/): train on only the first N batches, over and over, and say at the end whether
    # the training loss fell near zero (debug=overfit); 0: all batches
    overfit_batches: int = 0
    resume_check: bool = False  # read each step checkpoint back, compare it with the live state, resume from it
    profile_steps: int = 0  # steps torch.profiler records after two warm-up steps, into profile/ (debug=profile)


@dataclass
class TrainConfig:
    # Keys that say one thing two ways: both on one command line is refused by name (overrides.check_overrides).
    EXCLUSIVE_KEYS: ClassVar[tuple[tuple[str, str], ...]] = (("scheduler.warmup_steps", "scheduler.warmup_fraction"),)

    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # experiment trackers beside metrics.jsonl
    # labels for the run (tags=[baseline,long]): kept in its config, shown in summaries, TensorBoard and W&B
    tags: list[str] = field(default_factory=list)


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Convert Hydra's composed config to dataclasses, rejecting keys no schema knows, then check it."""
    return to_config(cfg, TrainConfig)



def validate_optimizer(o: OptimizerConfig) -> None:
    for key in ("embedding_lr", "head_lr"):
        value = getattr(o, key)
        check(value is None or value > 0, f"optimizer.{key}={value} must be > 0 (or null for optimizer.lr)")
    if o.name != OptimizerName.muon:
        return
    check(o.muon_lr > 0, f"optimizer.muon_lr={o.muon_lr} must be > 0")
    check(o.muon_weight_decay >= 0, f"optimizer.muon_weight_decay={o.muon_weight_decay} must be >= 0")
    check(0 <= o.muon_momentum < 1, f"optimizer.muon_momentum={o.muon_momentum} must be in [0, 1)")
    check(0 < o.muon_ns_steps < 100, f"optimizer.muon_ns_steps={o.muon_ns_steps} must be in [1, 99]")


def validate(cfg: TrainConfig) -> None:
    """Checks that span fields or need arithmetic; messages name the command-line key."""
    m, t, o, s, d, tok = cfg.model, cfg.trainer, cfg.optimizer, cfg.scheduler, cfg.data, cfg.tokenizer
    for key, value in [("model.d_model", m.d_model), ("model.n_heads", m.n_heads), ("model.n_layers", m.n_layers),
                       ("model.d_ff", m.d_ff), ("model.block_size", m.block_size),
                       ("trainer.batch_size", t.batch_size), ("trainer.grad_accum_steps", t.grad_accum_steps),
                       ("trainer.log_every", t.log_every), ("trainer.eval_every", t.eval_every),
                       ("trainer.eval_batches", t.eval_batches)]:
        check(value > 0, f"{key}={value} must be > 0")
    check(m.d_model % m.n_heads == 0, f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
    head_dim = m.d_model // m.n_heads
    if m.n_kv_heads is not None:
        check(m.n_kv_heads > 0 and m.n_heads % m.n_kv_heads == 0,
               f"model.n_kv_heads={m.n_kv_heads} must be > 0 and divide model.n_heads={m.n_heads}")
    if m.pos_emb == PosEmb.rope:
        check(head_dim % 2 == 0, f"model.pos_emb=rope needs an even head size, got d_model/n_heads={head_dim}")
    if m.vocab_size is not None:
        check(m.vocab_size > 0, f"model.vocab_size={m.vocab_size} must be > 0 (or null for the tokenizer's size)")
    check(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
    check(m.logit_softcap >= 0, f"model.logit_softcap={m.logit_softcap} must be >= 0 (0 turns it off)")
    check(o.head_lr is None or not m.tie_embeddings, f"optimizer.head_lr={o.head_lr} needs model.tie_embeddings"
                                                      "=false: a tied head is the token embedding (embedding_lr)")
    check(o.lr > 0, f"optimizer.lr={o.lr} must be > 0")
    check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
           f"optimizer.betas={o.betas} must be two numbers in [0, 1)")
    check(o.eps > 0, f"optimizer.eps={o.eps} must be > 0")
    check(m.rope_theta > 0, f"model.rope_theta={m.rope_theta} must be > 0")
    validate_rope_scaling(m)
    check(m.norm_eps > 0, f"model.norm_eps={m.norm_eps} must be > 0")
    check(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    check(s.warmup_steps >= 0, f"scheduler.warmup_steps={s.warmup_steps} must be >= 0")
    if s.warmup_fraction is not None:
        check(0 <= s.warmup_fraction < 1, f"scheduler.warmup_fraction={s.warmup_fraction} must be in [0, 1)")
    check(0 <= s.min_lr_ratio <= 1, f"scheduler.min_lr_ratio={s.min_lr_ratio} must be in [0, 1]")
    validate_optimizer(o)
    check(0 < s.decay_fraction <= 1, f"scheduler.decay_fraction={s.decay_fraction} must be in (0, 1]")
    check(t.max_steps >= 0 and t.epochs >= 0, "trainer.max_steps and trainer.epochs must be >= 0")
    check(t.max_steps > 0 or t.epochs > 0, "set trainer.max_steps > 0 or trainer.epochs > 0 to say how long to train")
    check(t.grad_clip >= 0, f"trainer.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    check(t.num_workers >= 0, f"trainer.num_workers={t.num_workers} must be >= 0")
    check(t.save_every >= 0, f"trainer.save_every={t.save_every} must be >= 0 (0: save only at the end)")
    check(t.keep_last >= 0, f"trainer.keep_last={t.keep_last} must be >= 0 (0 keeps every checkpoint)")
    if t.resume not in (None, "auto"):
        resume = Path(t.resume).expanduser()
        check(resume.is_dir(), f"trainer.resume={t.resume}: no such checkpoint folder; to "
                               "continue a run, use trainer.resume=auto hydra.run.dir=RUN_DIR")
        check(not (resume / "checkpoints").is_dir(), f"trainer.resume={t.resume} is a run folder, not a checkpoint: "
                                                     f"continue it with trainer.resume=auto hydra.run.dir={t.resume}, "
                                                     f"or give one of its step folders ({t.resume}/checkpoints/step_N)")
    if m.init_from is not None and not m.init_from.startswith(HUB_PREFIX):
        init = Path(m.init_from).expanduser()
        check(init.is_dir(), f"model.init_from={m.init_from}: no such checkpoint folder")
        check(not (init / "checkpoints").is_dir(), f"model.init_from={m.init_from} is a run folder, not a checkpoint: "
                                                   f"give one of its checkpoints, e.g. {m.init_from}/checkpoints/best "
                                                   "or .../final")
    check_device("trainer.device", t.device)
    check(t.compile.lower() in ("auto", "true", "false"), f"trainer.compile={t.compile} must be true, false or auto")
    check(0 <= t.eval_screen_batches < t.eval_batches, f"trainer.eval_screen_batches={t.eval_screen_batches} must be "
                                                       f">= 0 and below trainer.eval_batches={t.eval_batches}")
    check(t.eval_screen_batches == 0 or t.target_val_loss is not None,
          f"trainer.eval_screen_batches={t.eval_screen_batches} screens for trainer.target_val_loss: set that too")
    check(t.eval_screen_margin >= 0, f"trainer.eval_screen_margin={t.eval_screen_margin} must be >= 0")
    check(t.max_rollbacks >= 0, f"trainer.max_rollbacks={t.max_rollbacks} must be >= 0")
    check(0 < t.rollback_lr_scale <= 1, f"trainer.rollback_lr_scale={t.rollback_lr_scale} must be in (0, 1]")
    check(t.sample_every >= 0, f"trainer.sample_every={t.sample_every} must be >= 0 (0 disables samples)")
    check(t.sample_tokens > 0, f"trainer.sample_tokens={t.sample_tokens} must be > 0")
    check(t.sample_every == 0 or bool(t.sample_prompts),
           "trainer.sample_prompts is empty: give prompts to continue ('' starts a document) or trainer.sample_every=0")
    if t.micro_batch_size not in (None, "auto"):
        mb = t.micro_batch_size
        ok = mb.isdigit() and int(mb) > 0 and t.batch_size % int(mb) == 0
        check(ok, f"trainer.micro_batch_size={t.micro_batch_size} must be auto or a number of sequences that divides "
                  f"trainer.batch_size={t.batch_size}")
    if m.vocab_multiple is not None:
        check(m.vocab_multiple > 0, f"model.vocab_multiple={m.vocab_multiple} must be > 0 (1: no padding)")
    check(t.nproc_per_node == "auto" or (t.nproc_per_node.isdigit() and int(t.nproc_per_node) > 0),
          f"trainer.nproc_per_node={t.nproc_per_node} must be a number > 0 or auto (one process per visible GPU)")
    check(t.nproc_per_node in ("1", "auto") or t.strategy != Strategy.single,
          f"trainer.strategy=single runs one process; trainer.nproc_per_node={t.nproc_per_node} starts several: "
          "use trainer.strategy=auto, ddp or fsdp")
    sharded = t.strategy in (Strategy.fsdp, Strategy.hsdp)
    for key in ("fsdp_param_dtype", "fsdp_reduce_dtype"):
        value = FsdpDtype(getattr(t, key))
        check(value == FsdpDtype.auto or sharded, f"trainer.{key}={value.value} applies to trainer.strategy=fsdp or "
                                                  f"hsdp, not {Strategy(t.strategy).value}")
    check(t.hsdp_shard_size >= 0, f"trainer.hsdp_shard_size={t.hsdp_shard_size} must be >= 0 (0: one node's ranks)")
    check(t.hsdp_shard_size == 0 or t.strategy == Strategy.hsdp,
          f"trainer.hsdp_shard_size={t.hsdp_shard_size} applies to trainer.strategy=hsdp only")
    check(t.max_restarts >= 0, f"trainer.max_restarts={t.max_restarts} must be >= 0")
    check(t.dist_timeout_s > 0, f"trainer.dist_timeout_s={t.dist_timeout_s} must be > 0")
    for key in ("overfit_batches", "profile_steps"):
        check(getattr(t, key) >= 0, f"trainer.{key}={getattr(t, key)} must be >= 0 (0 turns it off)")
    check(not (t.overfit_batches and d.mixture), "trainer.overfit_batches repeats batches of one source: it does "
                                                 "not work with data.mixture; choose one of its sources")
    e = t.early_stopping
    check(e.patience >= 0, f"trainer.early_stopping.patience={e.patience} must be >= 0 (0 never stops early)")
    check(e.min_delta >= 0, f"trainer.early_stopping.min_delta={e.min_delta} must be >= 0")
    validate_data(d)
    validate_tokenizer(tok)
    validate_logger(cfg.logger)
    for tag in cfg.tags:
        check(0 < len(tag) <= 64, f"tags: {tag!r} must have 1 to 64 characters (W&B's limit)")


CHECKS[TrainConfig] = validate
