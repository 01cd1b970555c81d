"""The speed paths give the same numbers as the plain ones: activation checkpointing, CPU bf16 attention,
torch.compile; the benchmark script runs bare and lmtrain side by side."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmtrain.config import ModelConfig
from lmtrain.model import GPT
from lmtrain.model import loss as loss_module
from lmtrain.model.gpt import causal_attention

ROOT = Path(__file__).resolve().parents[2]


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_heads=4, n_layers=2, d_ff=64, block_size=16)
    return ModelConfig(**{**base, **overrides})


def loss_and_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 1):
    torch.manual_seed(seed)  # the same dropout masks for both models
    loss = model(x, y)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def counted(fn, calls: list):
    def wrapper(*args):
        calls.append(1)
        return fn(*args)
    return wrapper


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing_recomputes_blocks_and_changes_no_gradient(dropout):
    torch.manual_seed(0)
    plain = GPT(tiny(dropout=dropout, pos_emb="rope"))
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing = True
    calls = []
    for block in checkpointed.blocks:
        block.mlp.forward = counted(block.mlp.forward, calls)
    x, y = torch.randint(0, 64, (3, 16)), torch.randint(0, 64, (3, 16))
    loss, grads = loss_and_grads(plain, x, y)
    ckpt_loss, ckpt_grads = loss_and_grads(checkpointed, x, y)
    assert len(calls) == 2 * 2  # each of the 2 blocks ran again in the backward pass
    torch.testing.assert_close(ckpt_loss, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_cpu_bf16_attention_matches_sdpa_and_sees_no_future():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8).bfloat16().requires_grad_() for _ in range(3))
    out = causal_attention(q, k, v, 0.0)  # the CPU bf16 path: bf16 matmuls around a float32 softmax
    assert out.dtype == torch.bfloat16
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(out.float(), expected, rtol=0.02, atol=0.02)
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad).all()
    changed = v.detach().clone()
    changed[:, :, 9:] += 1.0  # values after position 8 change...
    assert torch.equal(causal_attention(q, k, changed, 0.0)[:, :, :9], out[:, :, :9])  # ...outputs up to 8 do not


def test_bf16_autocast_training_step_stays_close_to_float32():
    torch.manual_seed(0)
    model = GPT(tiny())
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    loss, grads = loss_and_grads(model, x, y)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss = model(x, y)
    bf16_loss.backward()
    assert bf16_loss.dtype == torch.float32
    torch.testing.assert_close(bf16_loss.detach(), loss, rtol=0.01, atol=0.01)
    for name, p in model.named_parameters():
        cosine = F.cosine_similarity(p.grad.flatten(), grads[name].flatten(), dim=0)
        assert cosine > 0.99, name


@pytest.mark.slow
def test_compiled_model_matches_eager_with_chunked_loss_and_checkpointing(monkeypatch):
    """torch.compile (inductor, which needs a C compiler on CPU) through every speed path at once."""
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 16 * 64)  # 48 rows of logits: 3 chunks
    torch.manual_seed(0)
    eager = GPT(tiny(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2))
    eager.activation_checkpointing = True
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin)
    x, y = torch.randint(0, 64, (3, 16)), torch.randint(0, 64, (3, 16))
    loss, grads = loss_and_grads(eager, x, y)
    compiled_loss, compiled_grads = loss_and_grads(compiled, x, y)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-5)
    for name, p in twin.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_bench_script_runs_bare_and_lmtrain_train_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    case = "gpt_tiny,n_layers=1,d_model=32,n_heads=2,d_ff=64,block_size=16,vocab_size=68,batch=4"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--case", case, "--precision", "fp32",
                             "--warmup", "1", "--steps", "20", "--rounds", "2", "--compile", "off", "on", "--json",
                             str(out)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Training throughput on" in result.stdout and "gpt_tiny 1L/32" in result.stdout
    assert "round 1 bare:" in result.stdout and "lmtrain/bare =" in result.stdout  # each run printed as it ends
    report = json.loads(out.read_text())
    rows = report["results"]
    order = [(1, "bare"), (1, "lmtrain"), (2, "lmtrain"), (2, "bare")]
    assert [(r["compile"], r["round"], r["way"]) for r in rows] == [(c, *run) for c in (False, True) for run in order]
    for r in rows:
        assert r["windows"] >= 1 and r["tokens_per_s"] > 0 and (r["mfu"] is None or 0 < r["mfu"] <= 1)
        assert r["lmtrain_over_bare"] > 0 and 0 < r["cpu_share"] and r["loss_ms"] > 0 and r["loss_peak_memory"] is None
    assert "MFU" in result.stdout and "Compiled against eager" in result.stdout
    ratios = report["compiled_over_eager"]  # each way and round, compiled over eager
    assert [(r["way"], r["round"]) for r in ratios] == [("bare", 1), ("lmtrain", 1), ("lmtrain", 2), ("bare", 2)]
    assert all(r["compiled_over_eager"] == pytest.approx(r["compiled"] / r["eager"]) for r in ratios)
