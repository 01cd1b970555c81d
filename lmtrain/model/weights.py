"""A model's weights as plain tensors: what checkpoints save and what exports map, checked for divergence."""

from __future__ import annotations

import torch
from torch import nn


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's weights, each shared (tied) tensor once, contiguous, on the CPU."""
    seen: set[int] = set()
    tensors = {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:  # a tied weight: the model re-ties it when built
            continue
        seen.add(t.data_ptr())
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors


def nonfinite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity: a diverged model's."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
