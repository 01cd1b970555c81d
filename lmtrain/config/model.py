"""The transformer's shape and architecture switches: `model=...` and `model.KEY=...`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


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
    mlp: Mlp = Mlp.gelu  # gelu (GPT-2), swiglu (Llama) or relu2 (squared ReLU)
    qk_norm: bool = False  # normalize queries and keys per head before attention
    norm_eps: float = 1e-5  # epsilon of every norm layer
    vocab_multiple: int | None = None  # pad embedding and LM head rows to a multiple of this; None: 64 on CUDA, else 1
    init_from: str | None = None  # checkpoint folder whose weights start the run (fresh optimizer, step 0)
    logit_softcap: float = 0.0  # > 0: logits become softcap * tanh(logits / softcap), bounded; 0: off
    zero_init_proj: bool = False  # attention and MLP output projections start at zero: each block starts as identity

