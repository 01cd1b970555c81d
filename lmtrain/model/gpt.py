"""A decoder-only transformer covering GPT-2 and Llama-style shapes, written to be read top to bottom.

One `ModelConfig` picks the pieces: learned or rotary positions (with Llama 3.1's frequency scaling),
LayerNorm or RMSNorm, a GELU, SwiGLU or squared-ReLU MLP, grouped-query attention (n_kv_heads < n_heads),
biases everywhere, nowhere or on q/k/v alone (Qwen2), optional per-head query/key norm, a tied or separate
LM head, soft-capped logits and zero-initialised output projections. Every block is pre-norm:
x = x + attn(norm(x)); x = x + mlp(norm(x)).

Weight layouts are chosen so an export to Hugging Face needs slicing, never permuting:
- `attn.qkv` stacks the projections as [q (n_heads*hs) | k (n_kv_heads*hs) | v (n_kv_heads*hs)] rows,
  the order of GPT-2's c_attn (transposed there, as it uses Conv1D) and of Llama's q/k/v_proj.
- RoPE uses the "rotate-half" convention of HF Llama (`rotate_half`, `apply_rotary_pos_emb`): feature i
  pairs with feature i + hs/2, not with its neighbour i + 1 as in Meta's original complex-number code.
- Query head h attends with key/value head h // (n_heads / n_kv_heads), as HF's `repeat_kv`.
- With model.vocab_multiple, the embedding and LM head have rows up to the next multiple (matmul widths
  that are multiples of 64 run faster on GPUs); the padding rows are never read, and the logits the model
  returns, and its loss, cover the real vocabulary only.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lmtrain.config import Mlp, ModelConfig, Norm, PosEmb, RopeScaling, RopeScalingKind
from lmtrain.model.loss import head_loss


class KVCache:
    """Keys and values of the positions already processed, one pair per layer, for generation.

    With a cache, a forward takes only the new tokens (the prompt first, then one token per step): they
    sit at positions `length` onwards and attend to every earlier position's keys and values kept here.
    """

    def __init__(self, n_layers: int):
        self.keys: list[Tensor | None] = [None] * n_layers  # (B, nkv, T_seen, hs) per layer
        self.values: list[Tensor | None] = [None] * n_layers

    @property
    def length(self) -> int:
        """Positions held; read it before a forward, which appends layer by layer."""
        return 0 if self.keys[-1] is None else self.keys[-1].size(2)

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add one layer's new keys and values (B, nkv, T_new, hs); returns all of them so far."""
        if self.keys[layer] is not None:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def padded_vocab(cfg: ModelConfig) -> int:
    """Rows of the embedding and LM head: vocab_size rounded up to model.vocab_multiple (None: no padding)."""
    multiple = cfg.vocab_multiple or 1
    return -(-cfg.vocab_size // multiple) * multiple


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == Norm.rmsnorm:
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def llama3_frequencies(inv_freq: Tensor, s: RopeScaling) -> Tensor:
    """Llama 3.1's rescaled frequencies: a wavelength longer than original_max_positions / low_freq_factor is
    stretched `factor` times, one shorter than original_max_positions / high_freq_factor is kept, and in
    between the two blend, linearly in how many wavelengths fit the original context."""
    fits = s.original_max_positions * inv_freq / (2 * math.pi)  # wavelengths per original context
    blend = ((fits - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)).clamp(0.0, 1.0)  # 0: stretch
    return (1 - blend) * inv_freq / s.factor + blend * inv_freq


def rope_cache(head_dim: int, max_len: int, theta: float,
               scaling: RopeScaling | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, each (max_len, head_dim), in the rotate-half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hs/2,)
    if scaling is not None and scaling.kind == RopeScalingKind.llama3:
        inv_freq = llama3_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs): both halves of a pair share one angle
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[i], x[i + hs/2]) of x (B, nh, T, hs) by its position's angle; cos, sin (T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)  # rotate_half
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def sdpa_takes_grouped_heads(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether SDPA's flash kernel can take fewer key/value heads than query heads (enable_gqa) here: CUDA at
    compute capability 8.0 and above, in fp16 or bf16. Its docs list only the flash and math kernels as taking
    grouped heads, and math materialises the (T x T) scores: below 8.0 (no flash), or in fp32, k and v are
    repeated instead, which the memory-efficient kernel takes."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(device) >= (8, 0))


def grouped_heads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, bool]:
    """k and v as SDPA should get them for q (B, nh, T, hs), and its enable_gqa flag (sdpa_takes_grouped_heads);
    otherwise k and v repeated to one head per query head."""
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return k, v, False
    if sdpa_takes_grouped_heads(q.device, q.dtype):
        return k, v, True
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), False  # (B, nh, T, hs)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout: float) -> Tensor:
    """softmax(q k^T / sqrt(hs) + causal mask) v for q (B, nh, T, hs) and k, v (B, nkv, T, hs), where query
    head h reads key/value head h // (nh / nkv): SDPA's grouped heads (flash kernels on CUDA, no copies of
    k and v), except in bf16 on a CPU, where SDPA's backward is several times slower than plain bf16
    matmuls and softmax (torch 2.13; measured in scripts/bench.py). That path stays in bf16 throughout: a
    CPU's bf16 softmax computes in float32 and rounds once, so it equals a float32 softmax cast to bf16,
    and its backward is within one bf16 rounding of a float32 one."""
    k, v, grouped = grouped_heads(q, k, v)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        T = q.shape[-2]
        mask = torch.full((T, T), float("-inf"), dtype=q.dtype).triu(1)  # -inf above the diagonal: the future
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + mask  # (B, nh, T, T), q scaled as SDPA does
        return F.dropout(scores.softmax(dim=-1), p=dropout) @ v  # (B, nh, T, hs)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=grouped)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.dropout = cfg.dropout
        # one matmul for q, k and v; k and v are narrower under grouped-query attention
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim,
                             bias=cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        # QK-norm: RMSNorm over each head's features keeps attention logits from growing without bound
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        B, T, C = x.shape
        hs, nh, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self.qkv(x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None:
            # in float32: under autocast q and k arrive in bf16 while the norm weights stay float32
            q, k = self.q_norm(q.float()).type_as(q), self.k_norm(k.float()).type_as(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, nkv, T_seen + T, hs)
        if cache is not None and k.size(2) > T:  # new queries see every cached position, and causally each other
            mask = None if T == 1 else torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(k.size(2) - T)
            k, v, grouped = grouped_heads(q, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=grouped)
        else:
            y = causal_attention(q, k, v, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """GPT-2: proj(gelu(fc x)). Llama's SwiGLU: proj(silu(fc_gate x) * fc_up x), i.e. w2(silu(w1 x) * w3 x).
    Squared ReLU (Primer, So et al. 2021; modded-nanogpt): proj(relu(fc x)^2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        if self.kind == Mlp.swiglu:
            self.fc_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
            self.fc_up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        else:
            self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
            self.gelu = nn.GELU(approximate="tanh") if self.kind == Mlp.gelu else None  # GPT-2's GELU
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == Mlp.swiglu:
            h = F.silu(self.fc_gate(x)) * self.fc_up(x)  # (B, T, d_ff)
        elif self.kind == Mlp.relu2:
            h = F.relu(self.fc(x)).square()  # (B, T, d_ff)
        else:
            h = self.gelu(self.fc(x))  # (B, T, d_ff)
        return self.drop(self.proj(h))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg, cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = make_norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache, layer)
        x = x + self.mlp(self.mlp_norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is not set: take it from the tokenizer before building the model")
        self.cfg = cfg
        # Recompute each block's activations in the backward pass instead of keeping them: less memory, ~1/3
        # more compute. A training setting (trainer.activation_checkpointing), so not part of ModelConfig.
        self.activation_checkpointing = False
        self.compiled_blocks: list[nn.Module] | None = None  # set by compile_blocks: the blocks under torch.compile
        self.loss_region = head_loss  # the final norm, head and loss; compile_blocks compiles it too
        rows = padded_vocab(cfg)  # vocab_size rounded up to model.vocab_multiple
        self.tok_emb = nn.Embedding(rows, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos_emb == PosEmb.learned else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm_f = make_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, rows, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one (V, C) matrix: reads tokens in, scores them out

        if cfg.pos_emb == PosEmb.rope:
            # Derived from the config, so kept out of the state_dict (persistent=False).
            self.register_buffer("rope_cos", torch.empty(cfg.block_size, cfg.d_model // cfg.n_heads), persistent=False)
            self.register_buffer("rope_sin", torch.empty_like(self.rope_cos), persistent=False)  # (block_size, hs)
            self._rope_tables()

        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(number of such writes),
        # so the stream's variance does not grow with depth.
        # model.zero_init_proj instead starts them at zero (modded-nanogpt): every block begins as the identity,
        # and the gradients still reach each projection through the residual stream.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                if cfg.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def _rope_tables(self) -> None:
        cos, sin = rope_cache(self.cfg.d_model // self.cfg.n_heads, self.cfg.block_size, self.cfg.rope_theta,
                              self.cfg.rope_scaling)
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def materialize(self, device: torch.device | str) -> None:
        """Give a model built on the meta device (no memory, no init) uninitialised memory on `device`, for
        weights to be copied in: the head tied again (to_empty makes every parameter anew) and the tables
        derived from the config computed."""
        self.to_empty(device=device)
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if self.cfg.pos_emb == PosEmb.rope:
            self._rope_tables()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # LayerNorm and RMSNorm already start at weight 1, bias 0

    def forward(self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Logits (B, T, V) for token ids idx (B, T); or, given targets (B, T), the mean cross-entropy.

        targets[b, t] is the token that should follow idx[b, t]: the caller shifts, the model does not.
        Targets equal to -100 are ignored (F.cross_entropy's default ignore_index).
        With a cache, idx continues the sequence the cache holds: its tokens sit at positions cache.length on.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0  # position of idx[:, 0]
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence length {start + T} is longer than model.block_size={self.cfg.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))  # (T, C) broadcast over B
        x = self.drop(x)
        pos = slice(start, start + T)
        rope = (self.rope_cos[pos], self.rope_sin[pos]) if self.cfg.pos_emb == PosEmb.rope else None
        # compiled blocks for whole sequences (training, evaluation); generation's cached steps stay eager
        blocks = self.compiled_blocks if self.compiled_blocks is not None and cache is None else self.blocks
        for i, block in enumerate(blocks):
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, rope, cache, i, use_reentrant=False)
            else:
                x = block(x, rope, cache, i)
        if targets is not None:
            return self.loss(x, targets)
        logits = self.lm_head(self.norm_f(x))  # (B, T, V_padded), in the compute dtype
        if self.cfg.logit_softcap > 0:  # Gemma 2's soft cap: smooth, and |logit| < softcap whatever the weights
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        return logits[..., :self.cfg.vocab_size]  # (B, T, V): the padding's scores are never seen

    def loss(self, x: Tensor, targets: Tensor) -> Tensor:
        """The mean cross-entropy of the last block's output x (B, T, C) against targets (B, T): the final norm,
        the head and the loss in one region (compiled with the blocks), never the whole (B, T, V) logits."""
        norm = self.norm_f
        return self.loss_region(x, targets, norm.weight, getattr(norm, "bias", None), self.lm_head.weight,
                                rms=self.cfg.norm == Norm.rmsnorm, eps=self.cfg.norm_eps,
                                vocab_size=self.cfg.vocab_size, softcap=self.cfg.logit_softcap)

    def compile_blocks(self) -> None:
        """Regional compilation: each block goes through torch.compile on its own, and so does the region after
        the last one (final norm, head and loss: lmtrain.model.loss.head_loss). The blocks share their code and
        shapes, so they share one compiled graph (per mode: training, evaluation), and a deep model compiles as
        fast as a shallow one. Static shapes: a new micro-batch size gets its own graph rather than turning
        the first one shape-generic. The modules and their state_dict keys stay as they are."""
        # Inductor's C++ backend (CPUs) fused independent loops horizontally into kernels that wrote out of
        # bounds and corrupted the heap (torch 2.13: a 6 x 384 fp32 block, glibc aborts); it gains little there
        torch._inductor.config.cpp.max_horizontal_fusion_size = 0
        _inductor_cache_per_cpu_capability()
        self.compiled_blocks = [torch.compile(block, dynamic=False) for block in self.blocks]
        self.loss_region = torch.compile(head_loss, dynamic=False)

    def uncompile(self) -> None:
        """Back to the eager blocks and loss region (after compile_blocks; a no-op otherwise)."""
        self.compiled_blocks, self.loss_region = None, head_loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, tied weights once. non_embedding leaves out the token and position tables
        (with tied embeddings that also removes the LM head, which is the same matrix)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6 * N + 12 * n_layers * d_model * block_size.

        PaLM (Chowdhery et al. 2022), appendix B, as nanoGPT's estimate_mfu. N counts the weights that
        take part in a matmul for every token: all parameters except the embedding lookups, but including
        the LM head even when it is tied to the token embedding (norms and biases are counted too; they
        are negligible). Each such weight costs 2 FLOPs forward and 4 backward. The second term is
        attention's QK^T and AV matmuls over a full block_size context (not halved for the causal mask).
        """
        n = self.num_params(non_embedding=True)
        if self.cfg.tie_embeddings:
            n += self.lm_head.weight.numel()  # the head's matmul runs whether or not its weight is shared
        c = self.cfg
        return 6.0 * n + 12.0 * c.n_layers * c.d_model * c.block_size


def _inductor_cache_per_cpu_capability() -> None:
    """Give inductor's on-disk cache a folder per ATen CPU capability (AVX512, AVX2, ...), unless the user chose
    one (TORCHINDUCTOR_CACHE_DIR). Its cache keys leave the capability out: in torch 2.13 kernels cached by an
    AVX512 run and reused under ATEN_CPU_CAPABILITY=avx2 gave NaN losses, and the reverse corrupted the heap."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    default = default_cache_dir()  # inductor sets the variable to this itself once imported
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default) != default:
        return
    capability = torch.backends.cpu.get_cpu_capability().lower()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default, f"cpu-{capability}")
