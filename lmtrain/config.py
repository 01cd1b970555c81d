"""Every configuration schema, registered in Hydra's ConfigStore, plus the cross-field checks.

YAML files under configs/ hold values only; the types, defaults and meanings live here. Hydra checks
each composed config against these schemas (unknown keys, wrong types, bad enum values), and
`to_train_config` converts the result to plain dataclasses once, at the command's entry, and runs the
checks that involve more than one field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from lmtrain.errors import ConfigError


class PosEmb(str, Enum):
    learned = "learned"
    rope = "rope"


class Norm(str, Enum):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class Mlp(str, Enum):
    gelu = "gelu"
    swiglu = "swiglu"


@dataclass
class ModelConfig:
    name: str = "gpt_tiny"  # preset name, shown in logs
    vocab_size: int | None = None  # None: the tokenizer's vocabulary size
    d_model: int = 128  # width of the residual stream
    n_heads: int = 4  # attention (query) heads; d_model must divide by it
    n_kv_heads: int | None = None  # key/value heads for grouped-query attention; None: n_heads
    n_layers: int = 4  # transformer blocks
    d_ff: int = 512  # hidden width of the MLP
    block_size: int = 128  # context length in tokens
    dropout: float = 0.0  # dropout probability on attention and residual paths
    bias: bool = True  # biases in linear layers and norms
    tie_embeddings: bool = True  # LM head shares the token embedding matrix
    pos_emb: PosEmb = PosEmb.learned  # learned absolute positions, or rotary (RoPE)
    rope_theta: float = 10000.0  # RoPE base frequency
    norm: Norm = Norm.layernorm  # layernorm (GPT-2) or rmsnorm (Llama)
    mlp: Mlp = Mlp.gelu  # gelu (GPT-2) or swiglu (Llama)
    qk_norm: bool = False  # normalize queries and keys per head before attention
    norm_eps: float = 1e-5  # epsilon of every norm layer
    init_from: str | None = None  # checkpoint folder whose weights start the run (fresh optimizer, step 0)


class OptimizerName(str, Enum):
    adamw = "adamw"


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 3e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.01  # decoupled weight decay; never applied to biases, norms, embeddings
    fused: bool | None = None  # fused AdamW kernel; None: on for CUDA and CPU, off otherwise


class SchedulerName(str, Enum):
    cosine = "cosine"
    constant = "constant"
    linear = "linear"


@dataclass
class SchedulerConfig:
    name: SchedulerName = SchedulerName.cosine
    warmup_steps: int = 100  # linear warm-up from 0 to optimizer.lr, in optimizer steps
    min_lr_ratio: float = 0.1  # final LR as a fraction of optimizer.lr (cosine, linear)


class SourceKind(str, Enum):
    pystdlib = "pystdlib"  # the Python standard library's own source files
    text_files = "text_files"  # local .txt / .md / .jsonl / .parquet files
    hf = "hf"  # a Hugging Face dataset (hub name or local folder)
    prepared = "prepared"  # a token cache folder that `lmtrain prepare` wrote (data.path)


@dataclass
class SourceConfig:
    """One corpus: where its documents come from and how validation is split off."""

    name: str = "pystdlib"  # shown in logs; names each source of a mixture
    source: SourceKind = SourceKind.pystdlib
    train_files: list[str] = field(default_factory=list)  # text_files: paths or globs for training
    val_files: list[str] = field(default_factory=list)  # text_files: paths or globs for validation
    path: str | None = None  # hf: dataset name on the hub, or a local folder; prepared: the cache folder
    config_name: str | None = None  # hf: dataset configuration (subset) name
    split: str = "train"  # hf: split to train on
    val_split: str | None = None  # hf: split to validate on; None: the dataset's `validation` split, else val_fraction
    revision: str | None = None  # hf: dataset revision (branch, tag or commit)
    streaming: bool = False  # hf: read and tokenize on the fly; the raw dataset is never downloaded whole
    text_column: str = "text"  # column that holds the documents
    val_fraction: float = 0.05  # share held out for validation when there is no validation split
    max_documents: int | None = None  # use at most this many documents per split; None: all
    max_tokens: int | None = None  # training tokens to prepare at most (validation: val_fraction of it); None: all


@dataclass
class MixtureSource(SourceConfig):
    weight: float = 1.0  # share of training sequences drawn from this source; weights are normalized


@dataclass
class DataConfig(SourceConfig):
    # Several sources sampled by weight, each a source config plus `weight`; when set, the single-source
    # keys above stay unused (set them per source: data.mixture.1.train_files=[...]).
    mixture: list[MixtureSource] = field(default_factory=list)
    cache_dir: str = "${oc.env:LMTRAIN_CACHE,'~/.cache/lmtrain'}"  # tokenized data and tokenizers


class TokenizerKind(str, Enum):
    bpe = "bpe"  # byte-level BPE trained on the training split
    char = "char"  # one token per character seen in the training split
    file = "file"  # a tokenizer.json file
    pretrained = "pretrained"  # a tokenizer from the Hugging Face hub, by name


@dataclass
class TokenizerConfig:
    kind: TokenizerKind = TokenizerKind.bpe
    vocab_size: int = 4096  # bpe: target vocabulary size, special tokens included
    min_frequency: int = 2  # bpe: a merge must occur this often
    train_documents: int | None = 20000  # bpe/char: documents to train on; None: all
    path: str | None = None  # file: path to a tokenizer.json
    name: str | None = None  # pretrained: hub name, e.g. gpt2


class Precision(str, Enum):
    auto = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"  # bf16 autocast; weights and optimizer state stay fp32


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
    device: str = "auto"  # auto: cuda if available, else cpu; or cpu, cuda, cuda:1, ...
    precision: Precision = Precision.auto
    compile: bool | None = None  # torch.compile the model; None: on for CUDA, off on CPU
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


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class PrepareConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


# --- Using a trained model: `lmtrain generate`, `lmtrain eval`, `lmtrain export` ---------------------------

@dataclass
class GenerateConfig:
    checkpoint: str = MISSING  # a checkpoint folder, or a run directory: its best, else latest, else final checkpoint
    prompt: str = ""  # text to continue; "" starts a new document
    prompt_file: str | None = None  # read the prompt from this file instead
    interactive: bool = False  # read prompts from stdin, one a line, until end of input
    max_new_tokens: int = 200  # most tokens to generate per sample (the context limit may stop it sooner)
    temperature: float = 0.8  # divides the logits; 0: greedy, always the most likely token
    top_k: int = 0  # draw only from the k most likely tokens; 0: no limit
    top_p: float = 1.0  # draw only from the smallest set of tokens whose probability reaches top_p; 1: no limit
    seed: int = 0  # seeds the draws: the same seed and settings give the same text
    num_samples: int = 1  # samples per prompt
    device: str = "auto"  # auto: cuda if available, else cpu; or cpu, cuda, cuda:1, ...


class EvalSplit(str, Enum):
    train = "train"
    val = "val"


@dataclass
class EvalConfig:
    checkpoint: str = MISSING  # a checkpoint folder, or a run directory: its best, else latest, else final checkpoint
    data: DataConfig | None = None  # data=NAME to evaluate on; None: the checkpoint's own training data
    split: EvalSplit = EvalSplit.val  # which split of the data
    max_tokens: int | None = None  # score at most this many tokens, from the split's start; None: all
    batch_size: int = 8  # windows of model.block_size tokens per forward
    out: str = "eval.json"  # where the results are written as JSON
    device: str = "auto"  # auto: cuda if available, else cpu; or cpu, cuda, cuda:1, ...
    precision: Precision = Precision.fp32  # fp32 (the default, exact), bf16 autocast, or auto: bf16 on CUDA
    progress: bool | None = None  # live progress bar; None: only when stdout is a terminal


class ExportFormat(str, Enum):
    hf = "hf"  # Hugging Face transformers: GPT2LMHeadModel or LlamaForCausalLM, with its tokenizer


@dataclass
class ExportConfig:
    checkpoint: str = MISSING  # a checkpoint folder, or a run directory: its best, else latest, else final checkpoint
    format: ExportFormat = ExportFormat.hf
    out: str = MISSING  # the folder to write
    overwrite: bool = False  # replace `out` if it exists


def register_configs() -> None:
    """Register each command's top-level schema; its YAML lists it first in its defaults."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="prepare_schema", node=PrepareConfig)
    store.store(name="generate_schema", node=GenerateConfig)
    store.store(name="eval_schema", node=EvalConfig)
    store.store(name="export_schema", node=ExportConfig)


Schema = TypeVar("Schema")


def to_config(cfg: DictConfig | dict, schema: type[Schema]) -> Schema:
    """Hydra's composed config (or plain values) as the schema's dataclass, rejecting keys it does not know,
    then checked by the schema's cross-field checks (CHECKS), if it has any."""
    try:
        # Re-merging the plain values into a fresh schema catches `+optimizer.lrr=1`, which Hydra
        # accepts and OmegaConf.to_object would silently drop.
        values = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=False)
        out = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is not set: give {e.full_key}=...") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}" if key else msg) from None
    if schema in CHECKS:
        CHECKS[schema](out)
    return out  # type: ignore[return-value]


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Convert Hydra's composed config to dataclasses, rejecting keys no schema knows, then check it."""
    return to_config(cfg, TrainConfig)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: TrainConfig) -> None:
    """Checks that span fields or need arithmetic; messages name the command-line key."""
    m, t, o, s, d, tok = cfg.model, cfg.trainer, cfg.optimizer, cfg.scheduler, cfg.data, cfg.tokenizer
    for key, value in [("model.d_model", m.d_model), ("model.n_heads", m.n_heads), ("model.n_layers", m.n_layers),
                       ("model.d_ff", m.d_ff), ("model.block_size", m.block_size),
                       ("trainer.batch_size", t.batch_size), ("trainer.grad_accum_steps", t.grad_accum_steps),
                       ("trainer.log_every", t.log_every), ("trainer.eval_every", t.eval_every),
                       ("trainer.eval_batches", t.eval_batches)]:
        _check(value > 0, f"{key}={value} must be > 0")
    _check(m.d_model % m.n_heads == 0, f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
    head_dim = m.d_model // m.n_heads
    if m.n_kv_heads is not None:
        _check(m.n_kv_heads > 0 and m.n_heads % m.n_kv_heads == 0,
               f"model.n_kv_heads={m.n_kv_heads} must be > 0 and divide model.n_heads={m.n_heads}")
    if m.pos_emb == PosEmb.rope:
        _check(head_dim % 2 == 0, f"model.pos_emb=rope needs an even head size, got d_model/n_heads={head_dim}")
    if m.vocab_size is not None:
        _check(m.vocab_size > 0, f"model.vocab_size={m.vocab_size} must be > 0 (or null for the tokenizer's size)")
    _check(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
    _check(o.lr > 0, f"optimizer.lr={o.lr} must be > 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
           f"optimizer.betas={o.betas} must be two numbers in [0, 1)")
    _check(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    _check(s.warmup_steps >= 0, f"scheduler.warmup_steps={s.warmup_steps} must be >= 0")
    _check(0 <= s.min_lr_ratio <= 1, f"scheduler.min_lr_ratio={s.min_lr_ratio} must be in [0, 1]")
    _check(t.max_steps >= 0 and t.epochs >= 0, "trainer.max_steps and trainer.epochs must be >= 0")
    _check(t.max_steps > 0 or t.epochs > 0, "set trainer.max_steps > 0 or trainer.epochs > 0 to say how long to train")
    _check(t.grad_clip >= 0, f"trainer.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    _check(t.num_workers >= 0, f"trainer.num_workers={t.num_workers} must be >= 0")
    _check(t.save_every >= 0, f"trainer.save_every={t.save_every} must be >= 0 (0: save only at the end)")
    _check(t.keep_last >= 0, f"trainer.keep_last={t.keep_last} must be >= 0 (0 keeps every checkpoint)")
    if t.resume not in (None, "auto"):
        _check(Path(t.resume).expanduser().is_dir(), f"trainer.resume={t.resume}: no such checkpoint folder; to "
                                                     "continue a run, use trainer.resume=auto hydra.run.dir=RUN_DIR")
    if m.init_from is not None:
        _check(Path(m.init_from).expanduser().is_dir(), f"model.init_from={m.init_from}: no such checkpoint folder")
    _check_device("trainer.device", t.device)
    _check(t.sample_every >= 0, f"trainer.sample_every={t.sample_every} must be >= 0 (0 disables samples)")
    _check(t.sample_tokens > 0, f"trainer.sample_tokens={t.sample_tokens} must be > 0")
    _check(t.sample_every == 0 or bool(t.sample_prompts),
           "trainer.sample_prompts is empty: give prompts to continue ('' starts a document) or trainer.sample_every=0")
    validate_data(d)
    validate_tokenizer(tok)


def as_plain_dict(obj: Any) -> Any:
    """A dataclass config as JSON-ready dicts and lists (enums become their values)."""
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True, enum_to_str=True)


def validate_data(d: DataConfig) -> None:
    if d.mixture:
        _check(not (d.train_files or d.val_files or d.path),
               "data.mixture is set: give files and paths per source (data.mixture.0.train_files=[...]), "
               "not as data.train_files, data.val_files or data.path")
        names = [s.name for s in d.mixture]
        _check(len(set(names)) == len(names), f"data.mixture names {names} must differ: they name each source "
                                              "in the logs (data.mixture.1.name=prose)")
        for i, s in enumerate(d.mixture):
            _check(s.weight > 0, f"data.mixture.{i}.weight={s.weight} must be > 0")
            _validate_source(s, f"data.mixture.{i}")
    else:
        _validate_source(d, "data")


def _validate_source(s: SourceConfig, key: str) -> None:
    _check(0 < s.val_fraction < 1, f"{key}.val_fraction={s.val_fraction} must be in (0, 1)")
    if s.max_tokens is not None:
        _check(s.max_tokens > 0, f"{key}.max_tokens={s.max_tokens} must be > 0 (or null for all)")
    if s.source == SourceKind.text_files:
        _check(bool(s.train_files), f"{key}.train_files is empty: give the text files to train on, "
                                    f"e.g. {key}.train_files=[corpus/*.txt]")
    if s.source == SourceKind.hf:
        _check(bool(s.path), f"{key}.path is not set: name a Hugging Face dataset, "
                             f"e.g. {key}.path=roneneldan/TinyStories")
    if s.source == SourceKind.prepared:
        _check(bool(s.path), f"{key}.path is not set: give the folder `lmtrain prepare` printed")


def validate_tokenizer(tok: TokenizerConfig) -> None:
    if tok.kind == TokenizerKind.bpe:
        _check(tok.vocab_size >= 260, f"tokenizer.vocab_size={tok.vocab_size} must be >= 260 "
                                      "(256 byte tokens plus specials)")
    if tok.kind == TokenizerKind.file:
        _check(bool(tok.path), "tokenizer.path is not set: give the tokenizer.json to use")
    if tok.kind == TokenizerKind.pretrained:
        _check(bool(tok.name), "tokenizer.name is not set: give a hub name, e.g. tokenizer.name=gpt2")


def validate_prepare(cfg: PrepareConfig) -> None:
    validate_data(cfg.data)
    validate_tokenizer(cfg.tokenizer)


def _check_device(key: str, value: str) -> None:
    _check(value == "auto" or value == "cpu" or value.startswith(("cuda", "mps")),
           f"{key}={value!r} must be auto, cpu, cuda or cuda:N")


def validate_generate(cfg: GenerateConfig) -> None:
    _check(cfg.max_new_tokens > 0, f"max_new_tokens={cfg.max_new_tokens} must be > 0")
    _check(cfg.temperature >= 0, f"temperature={cfg.temperature} must be >= 0 (0: greedy)")
    _check(cfg.top_k >= 0, f"top_k={cfg.top_k} must be >= 0 (0: no limit)")
    _check(0 < cfg.top_p <= 1, f"top_p={cfg.top_p} must be in (0, 1] (1: no limit)")
    _check(cfg.num_samples > 0, f"num_samples={cfg.num_samples} must be > 0")
    sources = [k for k, given in [("prompt", cfg.prompt != ""), ("prompt_file", cfg.prompt_file is not None),
                                  ("interactive", cfg.interactive)] if given]
    _check(len(sources) <= 1, f"{' and '.join(sources)} are set together: give the prompt one way")
    _check_device("device", cfg.device)


def validate_eval(cfg: EvalConfig) -> None:
    _check(cfg.batch_size > 0, f"batch_size={cfg.batch_size} must be > 0")
    if cfg.max_tokens is not None:
        _check(cfg.max_tokens > 0, f"max_tokens={cfg.max_tokens} must be > 0 (or null for the whole split)")
    _check(bool(cfg.out), "out is empty: name the JSON file to write, e.g. out=eval.json")
    if cfg.data is not None:
        validate_data(cfg.data)
    _check_device("device", cfg.device)


# The cross-field checks to_config runs for each schema.
CHECKS: dict[type, Callable[[Any], None]] = {TrainConfig: validate, PrepareConfig: validate_prepare,
                                            DataConfig: validate_data, GenerateConfig: validate_generate,
                                            EvalConfig: validate_eval}
