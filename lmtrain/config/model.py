"""The transformer's shape and architecture switches: `model=...` and `model.KEY=...`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum

from lmtrain.config.base import check
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
    relu2 = "relu2"  # proj(relu(fc x)^2): as cheap as GELU, learns faster at small scale (modded-nanogpt)


class RopeScalingKind(str, Enum):
    none = "none"  # RoPE's frequencies as rope_theta gives them
    llama3 = "llama3"  # Llama 3.1's: long wavelengths slowed by `factor`, short ones kept, a smooth blend between


@dataclass
class RopeScaling:
    """How RoPE's frequencies are rescaled to stretch a model's context (Llama 3.1 and later)."""

    kind: RopeScalingKind = RopeScalingKind.none
    factor: float = 8.0  # the frequencies of wavelengths above original_max_positions / low_freq_factor: divided by it
    low_freq_factor: float = 1.0  # llama3: the band of long wavelengths that are scaled whole
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_positions / this are left as they are
    original_max_positions: int = 8192  # the context the model was first trained at


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
    qkv_bias: bool | None = None  # biases on the query/key/value projection alone (Qwen2: true); None: model.bias
    tie_embeddings: bool = True  # LM head shares the token embedding matrix
    pos_emb: PosEmb = PosEmb.learned  # learned absolute positions, or rotary (RoPE)
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)  # RoPE frequencies rescaled for a longer context
    norm: Norm = Norm.layernorm  # layernorm (GPT-2) or rmsnorm (Llama)
    mlp: Mlp = Mlp.gelu  # gelu (GPT-2), swiglu (Llama) or relu2 (squared ReLU)
    qk_norm: bool = False  # normalize queries and keys per head before attention
    norm_eps: float = 1e-5  # epsilon of every norm layer
    vocab_multiple: int | None = None  # pad embedding and LM head rows to a multiple of this; None: 64 on CUDA, else 1
    # weights that start the run (fresh optimizer, step 0), and the model.* settings with them: an lmtrain checkpoint
    # folder, a Hugging Face transformers folder, or hf:<repo id> on the hub (docs/pretrained.md)
    init_from: str | None = None
    logit_softcap: float = 0.0  # > 0: logits become softcap * tanh(logits / softcap), bounded; 0: off
    zero_init_proj: bool = False  # attention and MLP output projections start at zero: each block starts as identity



def validate_rope_scaling(m: ModelConfig) -> None:
    r = m.rope_scaling
    if r.kind == RopeScalingKind.none:
        return
    check(m.pos_emb == PosEmb.rope, f"model.rope_scaling.kind={r.kind.value} needs model.pos_emb=rope: it scales "
                                    "RoPE's frequencies")
    check(r.factor >= 1, f"model.rope_scaling.factor={r.factor} must be >= 1")
    check(0 < r.low_freq_factor < r.high_freq_factor,
          f"model.rope_scaling.low_freq_factor={r.low_freq_factor} must be > 0 and below "
          f"model.rope_scaling.high_freq_factor={r.high_freq_factor}")
    check(r.original_max_positions > 0, f"model.rope_scaling.original_max_positions={r.original_max_positions} "
                                        "must be > 0")


HUB_PREFIX = "hf:"  # model.init_from=hf:<repo id>: a model on the Hugging Face hub


# model.* keys a run may set for itself when model.init_from gives the rest: they change how it trains or is
# laid out in memory, not what the weights compute (model.block_size has its own rule)
OWN_KEYS = ("name", "init_from", "dropout", "vocab_multiple", "zero_init_proj")


def longest_context(cfg: ModelConfig, window: int | None = None) -> tuple[int, str] | None:
    """The longest model.block_size that computes what a trained model does, and why: its learned positions, or
    its sliding attention window (a transformers model's); None: any (RoPE has no table of positions)."""
    if window is not None:
        return window, f"its sliding window of {window} positions"
    if cfg.pos_emb == PosEmb.learned:
        return cfg.block_size, f"its {cfg.block_size} learned positions"
    return None


def with_checkpoint_shape(given: ModelConfig, saved: ModelConfig, explicit: set[str], key: str,
                          window: int | None = None) -> ModelConfig:
    """The model a run that starts from a checkpoint trains: the checkpoint's own settings (`saved`), with the
    keys the user set (`explicit`, from the command line or a recipe) that a run may choose (OWN_KEYS, a
    model.block_size up to `longest_context`). Any other explicit key whose value differs from the checkpoint's
    is refused by name. window: the checkpoint's sliding attention window, if it has one."""
    max_block_size = longest_context(saved, window)
    values = {f.name: getattr(saved, f.name) for f in dataclasses.fields(ModelConfig)}
    conflicts = []
    for name in sorted(explicit & values.keys()):
        ours, theirs = getattr(given, name), values[name]
        if name in OWN_KEYS or ours == theirs:
            values[name] = ours
        elif name == "block_size" and (max_block_size is None or ours <= max_block_size[0]):
            values[name] = ours
        elif name == "block_size":
            conflicts.append(f"model.block_size={ours} is longer than {max_block_size[1]}")
        else:
            conflicts.append(f"model.{name}={_shown(ours)} (the checkpoint's is {_shown(theirs)})")
    if conflicts:
        raise ConfigError(f"{key} sets the model's shape, and these settings differ from it: {'; '.join(conflicts)}; "
                          "drop them (model.block_size may be lowered, model.dropout set)")
    values["init_from"] = given.init_from
    return ModelConfig(**values)


def _shown(value: object) -> str:
    value = value.value if isinstance(value, Enum) else value
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
