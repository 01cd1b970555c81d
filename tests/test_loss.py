"""The shift and the loss against a hand computation; gradient accumulation against one large batch."""

import contextlib
import copy
import math

import torch

from lmtrain.config import ModelConfig
from lmtrain.data.loader import shift
from lmtrain.model import GPT
from lmtrain.trainer import accumulate_gradients


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2, d_ff=32, block_size=8))


def test_loss_is_mean_negative_log_probability_of_the_next_token():
    model = tiny_model()
    windows = torch.tensor([[1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 5, 4]])
    x, y = shift(windows)
    loss = model(x, y)
    logits = model(x)  # (B, T, V)
    by_hand = []
    for b in range(2):
        for t in range(5):
            row = logits[b, t].tolist()
            log_z = math.log(sum(math.exp(v) for v in row))
            by_hand.append(log_z - row[windows[b, t + 1].item()])  # the target is the *next* token
    assert abs(loss.item() - sum(by_hand) / len(by_hand)) < 1e-5


def test_accumulated_gradient_equals_the_large_batch_gradient():
    model = tiny_model()
    twin = copy.deepcopy(model)
    windows = torch.randint(0, 11, (8, 7), generator=torch.Generator().manual_seed(1))
    x, y = shift(windows)
    k = 4
    micro = [(x[i::k], y[i::k]) for i in range(k)]  # 4 micro-batches of 2
    small_loss = accumulate_gradients(model, micro, torch.device("cpu"), contextlib.nullcontext)
    big_loss = accumulate_gradients(twin, [(x, y)], torch.device("cpu"), contextlib.nullcontext)
    assert torch.allclose(small_loss, big_loss, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), name
