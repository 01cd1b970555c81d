"""Next-token cross-entropy from the final hidden states through the LM head, without the whole logits.

`linear_cross_entropy(hidden, weight, targets)` computes the logits (hidden @ weight^T) a chunk of rows at a
time, each chunk's float32 log-softmax and, when gradients are wanted, in the same loop the gradients of the
hidden states and of the head's weight (softmax minus the target's one-hot, times the weight or the hidden
states). So the (tokens x vocabulary) logits exist one chunk at a time, in float32 only inside a chunk,
nothing of the vocabulary's size is zero-filled for a backward pass, and the backward pass only scales the
two gradients by the incoming one. Three matmuls per chunk, as an unfused forward and backward would run;
nothing is recomputed.

`head_loss` is the whole region after the last block: the final norm, the head and this loss. The model
compiles it (torch.compile) wherever it compiles its blocks, so on CUDA the softmax, the target's
subtraction, the soft cap and the casts fuse into the kernels around the three matmuls.

In float32 the loss and its gradients equal F.cross_entropy's on the full logits up to the order of
summation (tested); under bf16 autocast the matmuls run in bf16, as an autocast nn.Linear would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # targets equal to this are left out of the loss (F.cross_entropy's default)
CHUNK_ELEMENTS = 1 << 26  # logits per chunk: 256 MB in float32, a dozen chunks for GPT-2 at batch 16 x 1024


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of hidden @ weight[:vocab]^T, with both gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, vocab: int, softcap: float, rows: int,
                dtype: torch.dtype, grad_enabled: bool) -> Tensor:
        # needs_input_grad says True under torch.no_grad too: the caller's grad mode decides
        want_hidden, want_weight = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):  # the dtype is chosen by the caller
            h, w = hidden.to(dtype), weight[:vocab].to(dtype)  # (N, C), (V, C)
            total = torch.zeros((), device=hidden.device, dtype=torch.float32)
            grad_h, grad_w = [], None
            for h_chunk, t_chunk in zip(h.split(rows), targets.split(rows), strict=True):
                z = (h_chunk @ w.T).float()  # (n, V): this chunk's logits, rounded to `dtype` as nn.Linear's
                if softcap > 0:
                    capped = torch.tanh(z / softcap)
                    z = softcap * capped
                valid = (t_chunk != IGNORE_INDEX)[:, None]  # (n, 1)
                target = t_chunk.clamp(min=0)[:, None]  # (n, 1): ignored rows point at column 0, masked below
                log_p = torch.log_softmax(z, dim=-1)  # (n, V), one fused pass
                total = total - torch.where(valid, log_p.gather(1, target), 0.0).sum()
                if not (want_hidden or want_weight):
                    continue
                # d(row loss)/d(logits) = softmax - one-hot(target); ignored rows get none. Compiled, as one
                # elementwise expression (a compare with the column index fuses with the exp); eagerly, in place
                # (fewer passes over the logits: at GPT-2's vocabulary 13% less CPU time than the expression)
                if torch.compiler.is_compiling():
                    one_hot = torch.arange(vocab, device=hidden.device) == target  # (n, V)
                    g = torch.where(valid, log_p.exp() - one_hot.float(), 0.0)
                else:
                    g = log_p.exp_().scatter_add_(1, target, -valid.float()).masked_fill_(~valid, 0.0)
                if softcap > 0:
                    g = g * (1 - capped * capped)  # through softcap * tanh(z / softcap)
                g = g.to(dtype)  # (n, V)
                if want_hidden:
                    grad_h.append(g @ w)  # (n, C)
                if want_weight:
                    chunk_grad = (g.T @ h_chunk).float()  # (V, C)
                    grad_w = chunk_grad if grad_w is None else grad_w + chunk_grad
        count = (targets != IGNORE_INDEX).sum()
        if grad_w is not None and weight.shape[0] > vocab:  # vocabulary padding rows: never read, no gradient
            grad_w = torch.cat([grad_w, grad_w.new_zeros(weight.shape[0] - vocab, weight.shape[1])])
        grad_h = None if not grad_h else grad_h[0] if len(grad_h) == 1 else torch.cat(grad_h)  # (N, C)
        ctx.save_for_backward(grad_h, grad_w, count)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_out / count  # the forward's gradients are of the summed loss
        hidden_dtype, weight_dtype = ctx.dtypes
        dh = None if grad_h is None else (grad_h.to(hidden_dtype) * scale).to(hidden_dtype)
        dw = None if grad_w is None else (grad_w * scale).to(weight_dtype)
        return dh, dw, None, None, None, None, None, None


def compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype an nn.Linear of these tensors would multiply in: autocast's when it is on."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, vocab_size: int | None = None,
                         softcap: float = 0.0, chunk_elements: int | None = None) -> Tensor:
    """Mean cross-entropy of the logits hidden (N, C) @ weight[:vocab_size]^T against targets (N,), in float32,
    ignoring IGNORE_INDEX targets; vocab_size None: all of weight's rows (the rest is vocabulary padding).
    softcap > 0: logits = softcap * tanh(logits / softcap). chunk_elements: logits per chunk (CHUNK_ELEMENTS)."""
    vocab = vocab_size or weight.shape[0]
    rows = max(1, (chunk_elements or CHUNK_ELEMENTS) // vocab)
    return _LinearCrossEntropy.apply(hidden, weight, targets, vocab, softcap, rows, compute_dtype(hidden, weight),
                                     torch.is_grad_enabled())


def head_loss(x: Tensor, targets: Tensor, norm_weight: Tensor, norm_bias: Tensor | None, head_weight: Tensor, *,
              rms: bool, eps: float, vocab_size: int, softcap: float) -> Tensor:
    """The region after the last block: the final norm of x (B, T, C) (RMSNorm if `rms`, else LayerNorm), the LM
    head and the mean cross-entropy against targets (B, T). The parameters come in as tensors, not as modules,
    so a compiled copy of this function guards on nothing but their shapes and dtypes (FSDP2 swaps the module's
    parameters between their sharded and whole forms)."""
    shape = (x.shape[-1],)
    x = F.rms_norm(x, shape, norm_weight, eps) if rms else F.layer_norm(x, shape, norm_weight, norm_bias, eps)
    return linear_cross_entropy(x.flatten(0, 1), head_weight, targets.flatten(), vocab_size, softcap)
