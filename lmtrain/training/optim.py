"""The optimizer (AdamW, or Muon beside AdamW) and the learning-rate schedule, a pure function of step.

Each parameter has one role: a weight matrix inside the blocks, an embedding (token and position tables;
a tied LM head is the token table), the untied LM head, or the rest (norm gains and biases). Weight decay
applies to matrices and an untied head only. optimizer=muon gives the matrices to Muon and every other
role to AdamW. Each group starts at its role's peak LR (optimizer.lr, embedding_lr, head_lr, muon_lr);
the schedule scales all of them by one factor, lr_at(step) / optimizer.lr (every schedule is
proportional to its peak), so `set_lr` takes the schedule's LR for optimizer.lr.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmtrain.config import OptimizerConfig, OptimizerName, SchedulerConfig, SchedulerName
from lmtrain.training.muon import Muon

ROLES = ("matrix", "head", "embedding", "other")  # AdamW's group order: matrices and an untied head decay


def parameter_roles(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by role, each in model order; a tied weight appears once, as an embedding."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    head_weight = id(head.weight) if isinstance(head, nn.Linear) else None
    roles: dict[str, list[nn.Parameter]] = {role: [] for role in ROLES}
    for p in model.parameters():  # parameters() yields a tied weight once
        if not p.requires_grad:
            continue
        if id(p) in embeddings:
            roles["embedding"].append(p)
        elif id(p) == head_weight:
            roles["head"].append(p)
        else:
            roles["matrix" if p.dim() >= 2 else "other"].append(p)
    return roles


def param_groups(roles: dict[str, list[nn.Parameter]], cfg: OptimizerConfig, names: tuple[str, ...]) -> list[dict]:
    """AdamW groups for the named roles; neighbouring roles that share weight decay and peak LR share a group
    (with the defaults: matrices and head decay, embeddings and the rest do not: two groups)."""
    peak = {"matrix": cfg.lr, "head": cfg.head_lr or cfg.lr, "embedding": cfg.embedding_lr or cfg.lr, "other": cfg.lr}
    groups: list[dict] = []
    for role in names:
        decay = cfg.weight_decay if role in ("matrix", "head") else 0.0
        if not roles[role]:
            continue
        if groups and (groups[-1]["weight_decay"], groups[-1]["lr"]) == (decay, peak[role]):
            groups[-1]["params"] = groups[-1]["params"] + roles[role]
            groups[-1]["roles"] += f"+{role}"
        else:
            groups.append({"params": roles[role], "weight_decay": decay, "lr": peak[role],
                           "lr_scale": peak[role] / cfg.lr, "roles": role})
    return groups


class CombinedOptimizer:
    """Optimizers over disjoint parameters, stepped as one and seen as one by the LR schedule and checkpoints.

    `param_groups` lists every part's groups in order. `state_dict` numbers parameters across the parts,
    the first part's 0..n-1 and the next part's from n, exactly as one optimizer numbers its groups'
    parameters, so the checkpoint code saves and restores it like any optimizer.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({offset + index: values for index, values in sd["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups, state = state_dict["param_groups"], state_dict["state"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{len(groups)} parameter groups given for {len(self.param_groups)}")
        first, offset = 0, 0
        for opt in self.optimizers:
            mine = groups[first:first + len(opt.param_groups)]
            count = sum(len(g["params"]) for g in mine)
            opt.load_state_dict({
                "state": {index - offset: values for index, values in state.items() if 0 <= index - offset < count},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine]})
            first, offset = first + len(mine), offset + count

    def __repr__(self) -> str:
        return f"CombinedOptimizer({', '.join(type(opt).__name__ for opt in self.optimizers)})"


Optimizer = torch.optim.Optimizer | CombinedOptimizer


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device_type: str) -> Optimizer:
    # The fused kernel is one pass over all parameters: 3-4x faster than the per-tensor loop on a CPU too.
    fused = cfg.fused if cfg.fused is not None else device_type in ("cuda", "cpu")
    roles = parameter_roles(model)

    def adamw(names: tuple[str, ...]) -> torch.optim.AdamW:
        return torch.optim.AdamW(param_groups(roles, cfg, names), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 fused=fused)

    if cfg.name == OptimizerName.adamw:
        return adamw(ROLES)
    muon = Muon([{"params": roles["matrix"], "lr_scale": cfg.muon_lr / cfg.lr, "roles": "matrix"}],
                lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum,
                nesterov=cfg.muon_nesterov, ns_steps=cfg.muon_ns_steps, adjust_lr_fn=cfg.muon_adjust_lr.value,
                float32_orthogonalization=device_type != "cuda")  # bf16 matmuls are emulated on many CPUs
    return CombinedOptimizer(muon, adamw(("head", "embedding", "other")))


def warmup_steps(cfg: SchedulerConfig, total_steps: int) -> int:
    """The warm-up's length in optimizer steps: scheduler.warmup_fraction of the run when set, else warmup_steps."""
    return cfg.warmup_steps if cfg.warmup_fraction is None else round(cfg.warmup_fraction * total_steps)


def lr_at(step: int, total_steps: int, peak_lr: float, cfg: SchedulerConfig) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total_steps`.

    Linear warm-up over `warmup_steps(cfg, total_steps)`, then constant; or linear / cosine decay to
    min_lr_ratio * peak_lr at the last step; or (wsd) constant until the last decay_fraction of the steps,
    then a linear decay that reaches min_lr_ratio * peak_lr at the last step. Past the last step (a run
    extended beyond its schedule) the LR stays where the schedule ended.
    """
    warmup = warmup_steps(cfg, total_steps)
    if step < warmup:
        return peak_lr * (step + 1) / (warmup + 1)
    if cfg.name == SchedulerName.constant:
        return peak_lr
    min_lr = peak_lr * cfg.min_lr_ratio
    if cfg.name == SchedulerName.wsd:
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        into_decay = step - (total_steps - decay_steps)  # 0 at the first step whose LR is below the peak
        progress = 0.0 if into_decay < 0 else min(1.0, (into_decay + 1) / decay_steps)
        return peak_lr + (min_lr - peak_lr) * progress
    decay_steps = max(1, total_steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if cfg.name == SchedulerName.linear:
        return peak_lr + (min_lr - peak_lr) * progress
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Set every group's LR for a step whose schedule gives `lr` for optimizer.lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
