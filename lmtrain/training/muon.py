"""torch.optim.Muon, with its orthogonalization in float32 where bfloat16 matmuls are slow.

Muon (Keller Jordan, 2024; "Muon is Scalable for LLM Training", Moonshot AI, 2025) updates a weight matrix
with the orthogonalized momentum of its gradient: the Newton-Schulz iteration below pushes every singular
value of the update towards 1, so no direction dominates the step. torch.optim.Muon always runs that
iteration in bfloat16. That is right on a GPU, but on a CPU without bf16 instructions (AVX2 only, say)
every bf16 matmul is emulated: measured here with oneDNN and ATen held to AVX2, a 512^3 bf16 matmul ran at
0.8 GFLOP/s against 29 in fp32, and the iteration costs ~2.4 GFLOP per step for a 4-layer, d_model-128
model. So on a CPU the same update runs in float32 (accurate at least as well); elsewhere torch's own
step runs unchanged. Either way the parameter groups, state (one momentum buffer per matrix) and
state_dict are torch.optim.Muon's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# torch.optim.Muon's defaults: the quintic's coefficients, chosen (Keller Jordan) for the steepest slope at zero
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(update: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    """`steps` Newton-Schulz iterations X <- aX + (bA + cA^2)X with A = XX^T, in float32, on a 2-D update.

    Scaled first to Frobenius norm 1, so every singular value starts in (0, 1]; the iteration then moves each
    to between about 0.5 and 1.5, not exactly 1: the coefficients trade exactness for fewer steps.
    """
    a, b, c = coefficients
    x = update.float()
    wide = x.size(0) <= x.size(1)
    if not wide:
        x = x.T  # iterate on the smaller Gram matrix: A is (rows, rows) with rows <= cols
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T  # (rows, rows)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.T


def shape_scale(shape: torch.Size, adjust: str | None) -> float:
    """How a matrix's shape scales Muon's learning rate: torch.optim.Muon's two documented rules."""
    rows, cols = shape[0], shape[1]
    if adjust == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))  # "original" (and torch's default, None)


class Muon(torch.optim.Muon):
    """torch.optim.Muon whose Newton-Schulz iteration runs in float32 when `float32_orthogonalization` is set."""

    def __init__(self, params, *, float32_orthogonalization: bool, **kwargs):
        super().__init__(params, **kwargs)
        self.float32_orthogonalization = float32_orthogonalization

    @torch.no_grad()
    def step(self, closure=None):
        if not self.float32_orthogonalization:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)  # creates missing momentum buffers, as torch's step
            lr, momentum = group["lr"], group["momentum"]
            for p, grad, buf in zip(params, grads, buffers, strict=True):
                buf.lerp_(grad, 1 - momentum)  # the same moving average as torch.optim.Muon
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * shape_scale(p.shape, group["adjust_lr_fn"]))
        return loss
