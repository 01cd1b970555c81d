"""Model speed switches (vocabulary padding, SDPA's grouped heads) on the CPU, and the CUDA-only paths
(`@pytest.mark.cuda`: skipped without a CUDA device; scripts/gpu_check.sh runs them on a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmtrain.config import ModelConfig
from lmtrain.model import GPT
from lmtrain.model.gpt import causal_attention
from lmtrain.runs.metrics import read_metrics

from conftest import make_trainer, run_cli

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 300, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64,
                          "block_size": 16, **kw})


def test_vocab_padding_is_invisible_outside_the_model():
    torch.manual_seed(0)
    model = GPT(tiny(vocab_multiple=64, tie_embeddings=False))
    assert model.tok_emb.weight.shape[0] == model.lm_head.weight.shape[0] == 320
    x = torch.randint(300, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 300)  # no score for a padding id: nothing can sample or score one
    loss = model(x, x)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), x.flatten()))
    loss.backward()
    assert model.lm_head.weight.grad[300:].abs().sum() == 0  # the padding rows take no part


def test_grouped_query_attention_matches_repeated_heads():
    q, k, v = torch.randn(2, 8, 16, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    torch.testing.assert_close(causal_attention(q, k, v, 0.0), expected)


@pytest.mark.cuda
@cuda
def test_cuda_grouped_heads_in_bf16_match_repeated_heads():
    q, k, v = (torch.randn(2, n, 256, 64, device="cuda", dtype=torch.bfloat16) for n in (8, 2, 2))
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    torch.testing.assert_close(causal_attention(q, k, v, 0.0), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@cuda
def test_cuda_run_fits_its_micro_batch_pads_the_vocabulary_and_logs_peak_memory(tmp_path: Path):
    trainer = make_trainer(tmp_path, "trainer.max_steps=4", "trainer.micro_batch_size=auto", "trainer.compile=true",
                           "trainer.device=cuda")
    assert trainer.micro.size == 8  # a tiny model: the whole batch fits
    assert trainer.model.tok_emb.weight.shape[0] % 64 == 0  # model.vocab_multiple's default on CUDA
    batch = next(iter(trainer.train_loader))
    assert all(t.is_pinned() and t.is_contiguous() for t in batch)
    trainer.fit()
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert records and all(r["peak_memory"] > 0 for r in records)


@pytest.mark.cuda
@cuda
def test_cuda_out_of_memory_is_caught_and_halved(tmp_path: Path):
    """A real allocator out-of-memory error: memory is taken away until a step of 8 sequences cannot fit."""
    trainer = make_trainer(tmp_path, "trainer.max_steps=2", "trainer.device=cuda", "trainer.compile=false",
                           "model.block_size=256", "model.d_model=256", "model.n_heads=4")
    free, _ = torch.cuda.mem_get_info()
    real_forward = trainer.forward

    def forward(x, y):
        if x.shape[0] == 8:
            torch.empty(free, dtype=torch.uint8, device="cuda")  # more than is left: a real OutOfMemoryError
        return real_forward(x, y)

    trainer.forward = forward
    trainer.fit()
    assert trainer.micro.size == 4


@pytest.mark.slow
def test_gpt2_124m_recipe_composes_as_documented(tmp_path):
    result = run_cli("train", "experiment=gpt2_124m", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for line in ("n_layers: 12", "d_model: 768", "block_size: 1024", "vocab_multiple: 64", "kind: gpt2",
                 "path: HuggingFaceFW/fineweb-edu", "lr: 0.0006", "- 0.95", "weight_decay: 0.1",
                 "warmup_steps: 700", "batch_size: 64", "grad_accum_steps: 8", "micro_batch_size: auto"):
        assert f"  {line}\n" in result.stdout, line
    # the global batch: 64 sequences x 8 accumulation x 1024 tokens, ~0.5M tokens as GPT-2's recipe
    assert 64 * 8 * 1024 == 524_288
