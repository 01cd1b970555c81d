"""A model's weights as plain tensors: what checkpoints save and what exports map, checked for divergence;
the shapes a model expects, and saved weights fitted into a model built to start from them."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lmtrain.config import ModelConfig
from lmtrain.errors import CheckpointError


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


def saved_names(model: nn.Module) -> list[str]:
    """The names `model_tensors` saves: each weight once (a tied one under its first name), persistent buffers."""
    params = dict(model.named_parameters())
    every_param = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return [k for k in model.state_dict() if k in params or k not in every_param]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the weights a checkpoint of this model holds (a tied weight once), computed on the
    meta device: no memory, no time, whatever the model's size."""
    from lmtrain.model.gpt import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    state = model.state_dict()
    return {name: tuple(state[name].shape) for name in saved_names(model)}


VOCAB_ROWS = ("tok_emb.weight", "lm_head.weight")  # one row per token id, plus model.vocab_multiple's padding


def fits(name: str, saved: tuple[int, ...], shape: tuple[int, ...], vocab_size: int) -> bool:
    """Whether a saved tensor can start this model's tensor: the same shape, or one `fitted` adapts."""
    if saved == shape:
        return True
    if saved[1:] != shape[1:]:
        return False
    if name == "pos_emb.weight":  # a lower model.block_size uses the first positions
        return saved[0] >= shape[0]
    return name in VOCAB_ROWS and min(saved[0], shape[0]) >= vocab_size  # other vocabulary padding


def fitted(name: str, saved: torch.Tensor, shape: tuple[int, ...], vocab_size: int) -> torch.Tensor:
    """A saved tensor as this model holds it (`fits` must allow it): position rows cut to a lower
    model.block_size; vocabulary rows padded with zeros, or cut, to this model's model.vocab_multiple."""
    if tuple(saved.shape) == tuple(shape):
        return saved
    if name == "pos_emb.weight":
        return saved[: shape[0]]
    out = saved.new_zeros(shape)
    out[:vocab_size] = saved[:vocab_size]
    return out


def copy_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Copy (name, tensor) pairs into the model's own tensors one at a time, in their dtype and shape (`fitted`),
    so no second copy of the whole model is ever held. Every weight must come exactly once (a tied one once)."""
    own = model.state_dict()  # views of the model's tensors: copying into them fills the model
    expected = set(saved_names(model))
    seen: set[str] = set()
    for name, tensor in tensors:
        if name not in expected or name in seen:
            raise CheckpointError(f"{where}: {'unexpected' if name not in expected else 'repeated'} tensor {name}")
        target = own[name]
        if not fits(name, tuple(tensor.shape), tuple(target.shape), model.cfg.vocab_size):
            raise CheckpointError(f"{where}: {name} is {tuple(tensor.shape)}, the model's {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(fitted(name, tensor, tuple(target.shape), model.cfg.vocab_size))
        seen.add(name)
    if expected - seen:
        raise CheckpointError(f"{where}: no weights for {', '.join(sorted(expected - seen)[:5])}")


def model_from_tensors(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> nn.Module:
    """The model `cfg` describes, on the CPU in float32, its weights copied from `tensors`: built on the meta
    device and given memory once, so the weights exist once however large the model (no random init either)."""
    from lmtrain.model.gpt import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    model.materialize("cpu")
    copy_weights(model, tensors, where)
    return model
