"""Model speed switches (vocabulary padding, SDPA's grouped heads) on the CPU, and the CUDA-only paths
(`@pytest.mark.cuda`: skipped without a CUDA device; scripts/gpu_check.sh runs them on a GPU), in fp32 and bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmtrain.config import ModelConfig
from lmtrain.model import GPT
from lmtrain.model.gpt import causal_attention, sdpa_takes_grouped_heads
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


def test_grouped_heads_go_to_sdpa_only_where_the_flash_kernel_takes_them(monkeypatch):
    cuda_device = torch.device("cuda", 0)  # the decision alone: no CUDA call but the (faked) capability
    for capability, dtype, expected in [((9, 0), torch.bfloat16, True), ((8, 0), torch.float16, True),
                                        ((9, 0), torch.float32, False), ((7, 5), torch.float16, False)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert sdpa_takes_grouped_heads(cuda_device, dtype) is expected, (capability, dtype)
    assert not sdpa_takes_grouped_heads(torch.device("cpu"), torch.bfloat16)


PRECISIONS = pytest.mark.parametrize("precision", ["fp32", "bf16"])


def needs_native(precision: str):
    if precision == "bf16" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 is emulated below compute capability 8.0")


@pytest.mark.cuda
@cuda
@PRECISIONS
def test_cuda_run_fits_its_micro_batch_pads_the_vocabulary_and_logs_peak_memory(tmp_path: Path, precision):
    needs_native(precision)
    trainer = make_trainer(tmp_path, "trainer.max_steps=4", "trainer.micro_batch_size=auto", "trainer.compile=true",
                           "trainer.device=cuda", f"trainer.precision={precision}")
    assert trainer.precision.name == precision and trainer.compilation.on
    assert trainer.micro.size == 8  # a tiny model: the whole batch fits
    # the search's trial steps leave no mark on the logged peak: it was reset after them
    assert torch.cuda.max_memory_allocated() <= torch.cuda.memory_allocated() + 2**20
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # TF32 for float32 matmuls outside autocast
    assert trainer.model.tok_emb.weight.shape[0] % 64 == 0  # model.vocab_multiple's default on CUDA
    batch = next(iter(trainer.train_loader))
    assert all(t.is_pinned() and t.is_contiguous() for t in batch)
    trainer.fit()
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert records and all(r["peak_memory"] > 0 for r in records)
    assert all(r["loss"] == r["loss"] and r["loss"] < 10 for r in records)  # finite, and about ln(300)


def step_memory(trainer, size: int) -> int:
    """Bytes a forward and backward of `size` sequences adds at its peak over what is allocated before it."""
    x = torch.randint(300, (size, trainer.model_cfg.block_size), device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with trainer.precision.autocast():
        loss = trainer.forward(x, x)
    loss.backward()
    torch.cuda.synchronize()
    added = torch.cuda.max_memory_allocated() - before
    del loss
    trainer.model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return added


@pytest.mark.cuda
@cuda
@PRECISIONS
def test_cuda_out_of_memory_is_caught_halved_and_its_memory_given_back(tmp_path: Path, precision):
    """A real out-of-memory error inside a step: the GPU is filled until a step of 8 sequences no longer fits but
    one of 4 does (the caching allocator frees its cache and still fails), and nothing of it is kept after."""
    needs_native(precision)
    trainer = make_trainer(tmp_path, "trainer.max_steps=3", "trainer.device=cuda", "trainer.compile=false",
                           f"trainer.precision={precision}", "model.block_size=1024", "model.d_model=512",
                           "model.n_heads=8", "model.n_layers=4", "model.d_ff=2048")
    weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    four, eight = step_memory(trainer, 4), step_memory(trainer, 8)
    assert eight > four + 256 * 2**20  # activations dominate: halving frees hundreds of MiB
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    # room for the weights' gradients and AdamW's two moments, a step of 4 and half the difference to one of 8
    ballast = torch.empty(free - 3 * weights - four - (eight - four) // 2, dtype=torch.uint8, device="cuda")
    trainer.fit()
    assert trainer.micro.size == 4
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    del ballast
    torch.cuda.empty_cache()
    # what stays allocated is the weights and AdamW's state, nothing of the failed step's activations
    assert torch.cuda.memory_allocated() <= 3 * weights + 64 * 2**20
    assert torch.cuda.mem_get_info()[0] >= free - 3 * weights - 64 * 2**20


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_grouped_heads_never_materialise_the_scores(dtype):
    """Whatever the GPU, grouped-query attention keeps memory linear in T: flash with enable_gqa at compute
    capability 8.0 and above, repeated heads through the memory-efficient kernel below."""
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 attention kernels need compute capability 8.0")
    T = 4096
    q = torch.randn(1, 8, T, 64, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, 2, T, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    causal_attention(q, k, v, 0.0).sum().backward()
    torch.cuda.synchronize()
    scores = 8 * T * T * 2  # one (T x T) matrix per head in 16 bits: 256 MiB
    assert torch.cuda.max_memory_allocated() - before < scores / 4


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
