"""The shift and the loss against a hand computation; gradient accumulation against one large batch; the
chunked cross-entropy against the plain one."""

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lmtrain.config import ModelConfig
from lmtrain.data.loader import shift
from lmtrain.model import GPT
from lmtrain.model.loss import cross_entropy
from lmtrain.training.loop import accumulate_gradients


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


def saved_for_backward(fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fn()'s result and every tensor autograd saved for the backward pass while computing it."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        return fn(), saved


@pytest.mark.parametrize("rows_per_chunk", [1, 5, 8, 37, 100])
def test_chunked_cross_entropy_equals_the_plain_one_in_float32(rows_per_chunk):
    torch.manual_seed(0)
    logits = torch.randn(37, 11, requires_grad=True)
    targets = torch.randint(0, 11, (37,))
    targets[[3, 20]] = -100  # ignored positions count in neither the sum nor the mean
    expected = F.cross_entropy(logits, targets)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    loss = cross_entropy(logits, targets, chunk_elements=rows_per_chunk * 11)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-8)


def test_chunked_cross_entropy_keeps_no_float32_copy_of_the_logits():
    logits = torch.randn(64, 50, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 50, (64,))
    _, plain = saved_for_backward(lambda: F.cross_entropy(logits.float(), targets))
    assert any(t.dtype == torch.float32 and t.numel() == 64 * 50 for t in plain)  # what chunking avoids
    loss, chunked = saved_for_backward(lambda: cross_entropy(logits, targets, chunk_elements=16 * 50))
    assert loss.dtype == torch.float32
    assert not any(t.dtype == torch.float32 and t.numel() > 1 for t in chunked)
    assert max(t.numel() for t in chunked) == 16 * 50  # bf16 views of one chunk of the logits, nothing larger
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad).all()
