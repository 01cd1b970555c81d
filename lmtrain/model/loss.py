"""Next-token cross-entropy over the logits, without extra float32 copies of the whole (B*T, V) matrix.

The plain `F.cross_entropy(logits.float(), targets)` keeps a float32 copy of the logits and saves a
float32 log-softmax of the same size for the backward pass: with a 50k vocabulary and 8k tokens that is
1.6 GB each. Here the rows go through the loss in chunks of at most CHUNK_ELEMENTS logits, and each
chunk's float32 work is recomputed in the backward pass (activation checkpointing) instead of being
saved: besides the logits themselves, at most one chunk's float32 copies exist at a time. The
recomputation is elementwise (softmax), not a matmul, so it costs little.

In float32 the result equals F.cross_entropy's mean up to the order of summation (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # targets equal to this are left out of the loss (F.cross_entropy's default)
CHUNK_ELEMENTS = 1 << 26  # logits per chunk: 256 MB in float32, a dozen chunks for GPT-2 at batch 16 x 1024


def _summed_cross_entropy(logits: Tensor, targets: Tensor, vocab_size: int | None) -> Tensor:
    return F.cross_entropy(logits[:, :vocab_size].float(), targets, reduction="sum", ignore_index=IGNORE_INDEX)


def cross_entropy(logits: Tensor, targets: Tensor, chunk_elements: int | None = None,
                  vocab_size: int | None = None) -> Tensor:
    """Mean cross-entropy of logits (N, V_padded) against targets (N,), in float32 whatever the logits' dtype,
    over the first vocab_size columns (None: all; the rest is vocabulary padding).
    chunk_elements: logits per chunk; None: CHUNK_ELEMENTS."""
    rows = max(1, (chunk_elements or CHUNK_ELEMENTS) // logits.shape[-1])
    if logits.shape[0] <= rows:  # one chunk: the saved log-softmax is no larger than a chunk
        return F.cross_entropy(logits[:, :vocab_size].float(), targets, ignore_index=IGNORE_INDEX)
    total = torch.zeros((), device=logits.device, dtype=torch.float32)
    for chunk, chunk_targets in zip(logits.split(rows), targets.split(rows), strict=True):
        total = total + checkpoint(_summed_cross_entropy, chunk, chunk_targets, vocab_size, use_reentrant=False)
    return total / (targets != IGNORE_INDEX).sum()
