"""The optimizer (AdamW with decay only on matrices) and the learning-rate schedule, a pure function of step."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmtrain.config import OptimizerConfig, SchedulerConfig, SchedulerName


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: not on biases, norm gains or embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device_type: str) -> torch.optim.Optimizer:
    # The fused kernel is one pass over all parameters: 3-4x faster than the per-tensor loop on a CPU too.
    fused = cfg.fused if cfg.fused is not None else device_type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, fused=fused)


def lr_at(step: int, total_steps: int, peak_lr: float, cfg: SchedulerConfig) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total_steps`.

    Linear warm-up over warmup_steps, then constant, or linear / cosine decay to min_lr_ratio * peak_lr
    at the last step.
    """
    if step < cfg.warmup_steps:
        return peak_lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.name == SchedulerName.constant:
        return peak_lr
    min_lr = peak_lr * cfg.min_lr_ratio
    decay_steps = max(1, total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.name == SchedulerName.linear:
        return peak_lr + (min_lr - peak_lr) * progress
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
