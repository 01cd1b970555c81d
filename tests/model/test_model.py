"""The model: shapes and causality for every architecture, each component against a plain reference
implementation, parameter counts of the shipped presets against published figures, and a loss that falls."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lmtrain.config import ModelConfig
from lmtrain.model import GPT
from lmtrain.model.gpt import apply_rope, rope_cache

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "model"
VOCAB = 64


def tiny(**overrides) -> ModelConfig:
    """2 layers, d_model 32, block 16: the size every fast test uses."""
    base = dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, d_ff=64, block_size=16)
    return ModelConfig(**{**base, **overrides})


def llama_tiny(**overrides) -> ModelConfig:
    base = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, bias=False, tie_embeddings=False)
    return tiny(**{**base, **overrides})


# learned/rope x layernorm/rmsnorm x gelu/swiglu x MHA/GQA x qk_norm off/on
ARCHS = [
    dict(pos_emb=p, norm=n, mlp=m, n_kv_heads=kv, qk_norm=qk)
    for p, n, m, kv, qk in itertools.product(["learned", "rope"], ["layernorm", "rmsnorm"], ["gelu", "swiglu"],
                                             [None, 2], [False, True])
]


def arch_id(a: dict) -> str:
    heads = "gqa" if a["n_kv_heads"] else "mha"
    return f"{a['pos_emb']}-{a['norm']}-{a['mlp']}-{heads}" + ("-qknorm" if a["qk_norm"] else "")


def load_preset(name: str, **overrides) -> ModelConfig:
    """The shipped YAML, checked against the schema exactly as the CLI does."""
    preset = OmegaConf.load(PRESETS / f"{name}.yaml").model  # the file's `model:` part (it also sets the LR)
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), preset, overrides)
    return OmegaConf.to_object(merged)


@pytest.mark.parametrize("arch", ARCHS, ids=arch_id)
def test_shapes_and_causality(arch):
    torch.manual_seed(0)
    model = GPT(tiny(**arch)).eval()
    idx = torch.randint(0, VOCAB, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, VOCAB)
    loss = model(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)
    assert model(idx[:, :5]).shape == (2, 5, VOCAB)  # shorter than block_size works too

    # changing tokens after position t leaves the logits at positions <= t untouched
    t = 7
    changed = idx.clone()
    changed[:, t + 1:] = torch.randint(0, VOCAB, (2, 16 - t - 1))
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1])
    assert not torch.allclose(before[:, t + 1:], after[:, t + 1:])


def test_longer_than_block_size_is_rejected():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_missing_vocab_size_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        GPT(tiny(vocab_size=None))


# ---- components against plain reference implementations ----

def reference_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE as complex multiplication: feature i and i + hs/2 are the real and imaginary parts."""
    T, hs = x.shape[-2], x.shape[-1]
    half = hs // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())  # (..., T, hs/2)
    freqs = torch.tensor([theta ** (-2 * i / hs) for i in range(half)], dtype=torch.float64)
    pos = torch.arange(T, dtype=torch.float64)
    z = z * torch.polar(torch.ones(T, half, dtype=torch.float64), torch.outer(pos, freqs))
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def test_rope_matches_complex_rotation():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 8)  # (B, nh, T, hs)
    cos, sin = rope_cache(8, 16, 10000.0)
    torch.testing.assert_close(apply_rope(x, cos, sin), reference_rope(x, 10000.0), atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)
    cos, sin = rope_cache(8, 16, 10000.0)
    rq = apply_rope(q.expand(16, 8), cos, sin)  # the same vector at every position
    rk = apply_rope(k.expand(16, 8), cos, sin)
    torch.testing.assert_close(rq[3] @ rk[1], rq[12] @ rk[10])
    torch.testing.assert_close(rq[5] @ rk[5], q @ k)


def test_rmsnorm_matches_reference():
    model = GPT(llama_tiny())
    norm = model.blocks[0].attn_norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 16, 32)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_swiglu_matches_reference():
    mlp = GPT(llama_tiny()).blocks[0].mlp
    x = torch.randn(2, 16, 32)
    w1, w3, w2 = mlp.fc_gate.weight, mlp.fc_up.weight, mlp.proj.weight
    gate = torch.einsum("btc,fc->btf", x, w1)
    expected = torch.einsum("btf,cf->btc", gate * torch.sigmoid(gate) * torch.einsum("btc,fc->btf", x, w3), w2)
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_gqa_attention_matches_reference(rope, qk_norm):
    """Head by head with an explicit mask and softmax; query head h reads key/value head h // 2."""
    torch.manual_seed(0)
    cfg = llama_tiny(n_heads=4, n_kv_heads=2, bias=True, qk_norm=qk_norm)
    attn = GPT(cfg).blocks[0].attn
    B, T, C, nh, nkv, hs = 2, 16, 32, 4, 2, 8
    x = torch.randn(B, T, C)
    w, b = attn.qkv.weight, attn.qkv.bias
    q = (x @ w[: nh * hs].T + b[: nh * hs]).view(B, T, nh, hs)
    k = (x @ w[nh * hs : (nh + nkv) * hs].T + b[nh * hs : (nh + nkv) * hs]).view(B, T, nkv, hs)
    v = (x @ w[(nh + nkv) * hs :].T + b[(nh + nkv) * hs :]).view(B, T, nkv, hs)
    if qk_norm:
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-5)  # norm weights start at 1
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-5)
    if rope:
        q = reference_rope(q.transpose(1, 2), 10000.0).transpose(1, 2)
        k = reference_rope(k.transpose(1, 2), 10000.0).transpose(1, 2)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    heads = []
    for h in range(nh):
        g = h // (nh // nkv)
        scores = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(hs)  # (B, T, T)
        scores = scores.masked_fill(~mask, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[:, :, g])  # (B, T, hs)
    expected = attn.proj(torch.cat(heads, dim=-1))
    cos_sin = rope_cache(hs, T, cfg.rope_theta) if rope else None
    torch.testing.assert_close(attn(x, cos_sin), expected, atol=1e-5, rtol=1e-4)


def test_rope_buffers_stay_out_of_state_dict():
    model = GPT(llama_tiny())
    assert not any("rope" in key for key in model.state_dict())
    GPT(llama_tiny()).load_state_dict(model.state_dict())  # strict load still works


# ---- initialisation, tying, determinism ----

def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(tiny(d_model=128, d_ff=512, n_layers=8))
    block = model.blocks[0]
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert block.mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.all(block.attn.qkv.bias == 0) and torch.all(block.attn_norm.weight == 1)


def test_tied_embeddings_share_storage():
    tied, untied = GPT(tiny()), GPT(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == VOCAB * 32


def test_eval_without_dropout_is_deterministic():
    idx = torch.randint(0, VOCAB, (2, 16))
    model = GPT(llama_tiny()).eval()
    torch.testing.assert_close(model(idx), model(idx), rtol=0, atol=0)
    noisy = GPT(tiny(dropout=0.5))
    assert not torch.equal(noisy.train()(idx), noisy(idx))  # dropout is live in training mode
    torch.testing.assert_close(noisy.eval()(idx), noisy(idx), rtol=0, atol=0)


# ---- the shipped presets against published parameter counts ----

@pytest.mark.parametrize(
    ("preset", "vocab", "expected"),
    [
        ("gpt_small", 50257, 124_439_808),  # GPT-2 124M (nanoGPT's count: tied head, with position table)
        ("gpt_medium", 50257, 354_823_168),  # GPT-2 medium
        ("gpt_large", 50257, 774_030_080),  # GPT-2 large
        ("llama_1b", None, 1_100_048_384),  # TinyLlama-1.1B; the preset fixes vocab 32000
    ],
)
def test_preset_parameter_counts(preset, vocab, expected):
    cfg = load_preset(preset, **({"vocab_size": vocab} if vocab else {}))
    with torch.device("meta"):  # shapes only: no memory, no time
        model = GPT(cfg)
    assert model.num_params() == expected


def test_all_presets_build():
    for path in sorted(PRESETS.glob("*.yaml")):
        assert path.read_text().startswith("# "), f"{path.name} should open with a comment naming the shape"
        cfg = load_preset(path.stem, vocab_size=32000)
        assert cfg.name == path.stem
        with torch.device("meta"):
            GPT(cfg)
    with torch.device("meta"):
        assert 124e6 < GPT(load_preset("llama_small", vocab_size=32000)).num_params() < 126e6


def test_flops_per_token_follows_palm_formula():
    cfg = load_preset("gpt_small", vocab_size=50257)
    with torch.device("meta"):
        model = GPT(cfg)
    n = 124_439_808 - 1024 * 768  # nanoGPT's N: everything but the position table (the tied head counts)
    assert model.flops_per_token() == 6 * n + 12 * 12 * 768 * 1024
    untied = GPT(tiny(tie_embeddings=False))
    assert untied.flops_per_token() == 6 * (untied.num_params() - VOCAB * 32 - 16 * 32) + 12 * 2 * 32 * 16


# ---- it learns ----

@pytest.mark.parametrize("cfg", [tiny(), llama_tiny()], ids=["gpt", "llama"])
def test_loss_falls_on_a_fixed_batch(cfg):
    torch.manual_seed(0)
    model = GPT(cfg)
    data = torch.randint(0, VOCAB, (4, 17))
    x, y = data[:, :-1], data[:, 1:]  # the caller shifts
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.3)  # small init: close to uniform at the start
    assert losses[-1] < 0.5 * losses[0]


def test_loss_is_cross_entropy_of_logits():
    model = GPT(tiny()).eval()
    x, y = torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16))
    torch.testing.assert_close(model(x, y), F.cross_entropy(model(x).flatten(0, 1), y.flatten()))


# ---- the speedrun switches (each off by default) ----

def test_speedrun_switches_are_off_by_default():
    cfg = ModelConfig()
    assert cfg.mlp == "gelu" and cfg.tie_embeddings and cfg.logit_softcap == 0 and not cfg.zero_init_proj


def test_relu2_mlp_matches_reference():
    mlp = GPT(tiny(mlp="relu2")).blocks[0].mlp
    x = torch.randn(2, 16, 32)
    hidden = torch.clamp(x @ mlp.fc.weight.T + mlp.fc.bias, min=0) ** 2
    torch.testing.assert_close(mlp(x), hidden @ mlp.proj.weight.T + mlp.proj.bias)
    assert hidden.min() == 0 and not any(isinstance(m, torch.nn.GELU) for m in mlp.modules())


def test_logit_softcap_bounds_the_logits_smoothly():
    torch.manual_seed(0)
    plain, capped = GPT(tiny()), GPT(tiny(logit_softcap=2.0))
    with torch.no_grad():
        plain.lm_head.weight.mul_(200)  # tied: the logits grow far past the cap
    capped.load_state_dict(plain.state_dict())
    idx, targets = torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16))
    raw, out = plain(idx), capped(idx)
    assert raw.abs().max() > 20 and out.abs().max() <= 2.0
    torch.testing.assert_close(out, 2.0 * torch.tanh(raw / 2.0))
    torch.testing.assert_close(capped(idx, targets), F.cross_entropy(out.flatten(0, 1), targets.flatten()))


def test_zero_init_proj_starts_every_block_as_the_identity():
    torch.manual_seed(0)
    model = GPT(tiny(zero_init_proj=True))
    for block in model.blocks:
        assert torch.all(block.attn.proj.weight == 0) and torch.all(block.mlp.proj.weight == 0)
        assert block.attn.qkv.weight.std() > 0.01  # the rest keeps its normal init
        x = torch.randn(2, 16, 32)
        torch.testing.assert_close(block(x), x)
    idx, targets = torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16))
    model(idx, targets).backward()
    assert model.blocks[0].mlp.proj.weight.grad.abs().sum() > 0  # and still learns


def test_untied_head_is_its_own_matrix_and_learns_apart_from_the_embedding():
    torch.manual_seed(0)
    model = GPT(tiny(tie_embeddings=False))
    head_before = model.lm_head.weight.detach().clone()
    idx = torch.randint(0, VOCAB, (2, 16))
    model(idx, idx).backward()
    assert model.lm_head.weight.grad is not None and model.tok_emb.weight.grad is not None
    assert not torch.equal(model.lm_head.weight.grad, model.tok_emb.weight.grad)
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    assert torch.equal(model.lm_head.weight, head_before)
