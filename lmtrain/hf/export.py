"""A checkpoint as a Hugging Face transformers folder (`lmtrain export format=hf`).

GPT presets (learned positions, LayerNorm, GELU or squared ReLU, full multi-head attention) become GPT2LMHeadModel;
Llama-style models (RoPE, RMSNorm, SwiGLU, grouped-query attention) become LlamaForCausalLM. The
folder holds config.json, model.safetensors, generation_config.json, and the tokenizer as tokenizer.json
plus tokenizer_config.json, so AutoModelForCausalLM and AutoTokenizer load it. lmtrain's weight layout
was chosen for this (see lmtrain/model/gpt.py): the mapping renames, transposes for GPT-2's Conv1D, and
slices the fused qkv projection; it never permutes. Anything else is refused, naming the setting.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor

from lmtrain.config import Mlp, ModelConfig, Norm, PosEmb
from lmtrain.data.tokenizer import PAD, UNKNOWN, TextTokenizer
from lmtrain.errors import ConfigError
from lmtrain.files import apply_umask
from lmtrain.model import GPT
from lmtrain.model.weights import model_tensors


def hf_architecture(cfg: ModelConfig) -> str:
    """"gpt2" or "llama": the transformers architecture that computes exactly what this model does."""
    if cfg.qk_norm:
        raise ConfigError("export format=hf: model.qk_norm=true has no counterpart in GPT-2 or Llama")
    if cfg.logit_softcap > 0:
        raise ConfigError(f"export format=hf: model.logit_softcap={cfg.logit_softcap} has no counterpart in GPT-2 or "
                          "Llama, which would compute other logits; train with model.logit_softcap=0 to export")
    parts = (cfg.pos_emb, cfg.norm, cfg.mlp)
    if parts in ((PosEmb.learned, Norm.layernorm, Mlp.gelu), (PosEmb.learned, Norm.layernorm, Mlp.relu2)):
        if cfg.n_kv_heads not in (None, cfg.n_heads):
            raise ConfigError(f"export format=hf: GPT-2 has no grouped-query attention (model.n_kv_heads="
                              f"{cfg.n_kv_heads}, model.n_heads={cfg.n_heads})")
        return "gpt2"
    if parts == (PosEmb.rope, Norm.rmsnorm, Mlp.swiglu):
        return "llama"
    pos_emb, norm, mlp = PosEmb(cfg.pos_emb).value, Norm(cfg.norm).value, Mlp(cfg.mlp).value
    raise ConfigError(f"export format=hf: model.pos_emb={pos_emb}, model.norm={norm}, model.mlp={mlp} is neither "
                      "GPT-2 (learned, layernorm, gelu or relu2) nor Llama (rope, rmsnorm, swiglu)")


def gpt2_weights(w: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """GPT2LMHeadModel's tensors. Its Conv1D layers store weights as (in, out): transposed from nn.Linear.
    Without model.bias, GPT-2's biases are zeros, which computes the same."""

    def bias(name: str, size: int) -> Tensor:
        return w.get(name, torch.zeros(size))

    C = cfg.d_model
    out = {"transformer.wte.weight": w["tok_emb.weight"], "transformer.wpe.weight": w["pos_emb.weight"],
           "transformer.ln_f.weight": w["norm_f.weight"], "transformer.ln_f.bias": bias("norm_f.bias", C)}
    for i in range(cfg.n_layers):
        a, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs, size in [("attn_norm", "ln_1", C), ("mlp_norm", "ln_2", C)]:
            out[h + theirs + ".weight"] = w[a + ours + ".weight"]
            out[h + theirs + ".bias"] = bias(a + ours + ".bias", size)
        for ours, theirs, size in [("attn.qkv", "attn.c_attn", 3 * C), ("attn.proj", "attn.c_proj", C),
                                   ("mlp.fc", "mlp.c_fc", cfg.d_ff), ("mlp.proj", "mlp.c_proj", C)]:
            out[h + theirs + ".weight"] = w[a + ours + ".weight"].t().contiguous()
            out[h + theirs + ".bias"] = bias(a + ours + ".bias", size)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = w["lm_head.weight"]
    return out


def llama_weights(w: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """LlamaForCausalLM's tensors: the same nn.Linear layout, with qkv's rows cut into q, k and v."""
    hs = cfg.d_model // cfg.n_heads
    q_rows, kv_rows = cfg.n_heads * hs, (cfg.n_kv_heads or cfg.n_heads) * hs
    out = {"model.embed_tokens.weight": w["tok_emb.weight"], "model.norm.weight": w["norm_f.weight"]}
    for i in range(cfg.n_layers):
        a, h = f"blocks.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = w[a + "attn_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = w[a + "mlp_norm.weight"]
        kinds = ["weight", "bias"] if cfg.bias else ["weight"]
        for kind in kinds:
            q, k, v = w[a + f"attn.qkv.{kind}"].split([q_rows, kv_rows, kv_rows], dim=0)
            for name, t in [("q_proj", q), ("k_proj", k), ("v_proj", v)]:
                out[h + f"self_attn.{name}.{kind}"] = t.contiguous()
            for ours, theirs in [("attn.proj", "self_attn.o_proj"), ("mlp.fc_gate", "mlp.gate_proj"),
                                 ("mlp.fc_up", "mlp.up_proj"), ("mlp.proj", "mlp.down_proj")]:
                out[h + f"{theirs}.{kind}"] = w[a + f"{ours}.{kind}"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = w["lm_head.weight"]
    return out


def hf_model(model: GPT, tokenizer: TextTokenizer):
    """The transformers model (on the CPU, fp32) that computes what the lmtrain model does."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("export format=hf needs transformers: pip install 'lmtrain[hf]'") from None
    cfg: ModelConfig = model.cfg
    arch = hf_architecture(cfg)
    pad_id = tokenizer.tokenizer.token_to_id(PAD)
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=tokenizer.eot_id,
                  eos_token_id=tokenizer.eot_id, pad_token_id=pad_id)
    weights = {k: v.float() for k, v in model_tensors(model).items()}
    for name in ("tok_emb.weight", "lm_head.weight"):  # without the model.vocab_multiple padding rows
        if name in weights:
            weights[name] = weights[name][:cfg.vocab_size]
    if arch == "gpt2":
        config = transformers.GPT2Config(
            n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
            n_positions=cfg.block_size,  # gelu_new: GELU's tanh approximation; relu2: transformers' squared ReLU
            activation_function="relu2" if cfg.mlp == Mlp.relu2 else "gelu_new",
            layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, **common)
        model_class, state = transformers.GPT2LMHeadModel, gpt2_weights(weights, cfg)
    else:
        config = transformers.LlamaConfig(
            hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
            hidden_act="silu", max_position_embeddings=cfg.block_size,
            rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, attention_bias=cfg.bias, mlp_bias=cfg.bias,
            attention_dropout=cfg.dropout, **common)
        model_class, state = transformers.LlamaForCausalLM, llama_weights(weights, cfg)
    if cfg.tie_embeddings:  # transformers keeps the tie; the key is there for a strict load
        state["lm_head.weight"] = weights["tok_emb.weight"]
    hf = model_class(config)
    hf.load_state_dict(state, strict=True)  # strict: every tensor of the transformers model is mapped
    return hf.eval()


def tokenizer_config(tok: TextTokenizer, block_size: int) -> dict:
    """tokenizer_config.json: AutoTokenizer builds a fast tokenizer from tokenizer.json with these specials."""
    present = lambda token: tok.tokenizer.token_to_id(token) is not None
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.eot_token, "eos_token": tok.eot_token,
            "pad_token": PAD if present(PAD) else tok.eot_token, **({"unk_token": UNKNOWN} if present(UNKNOWN) else {}),
            "model_max_length": block_size, "clean_up_tokenization_spaces": False}


EXPORT_MARKER = ".lmtrain-export"  # in every folder an export wrote: only such a folder is ever replaced


def check_export_target(out: Path, checkpoint: Path, overwrite: bool) -> None:
    """An export writes into a new folder, or replaces one an earlier export made (with overwrite=true);
    never into or over the checkpoint it reads, or a folder that holds it (its run, say)."""
    target, source = out.resolve(), Path(checkpoint).resolve()
    if target == source or target in source.parents or source in target.parents:
        raise ConfigError(f"out={out} would write into or over the checkpoint being exported ({checkpoint}) or "
                          "the run that holds it; choose a new folder, e.g. out=exported/hf")
    if target.is_file():
        raise ConfigError(f"out={out} is a file; give a folder path")
    if target.is_dir() and any(target.iterdir()):
        if not (target / EXPORT_MARKER).is_file():
            raise ConfigError(f"out={out} is a folder that `lmtrain export` did not write; choose a new folder "
                              "(an earlier export's folder can be replaced with overwrite=true)")
        if not overwrite:
            raise ConfigError(f"out={out} already holds an export; choose another folder or add overwrite=true")


def export_hf(model: GPT, tokenizer: TextTokenizer, source: Path, out: Path, overwrite: bool = False) -> Path:
    """Write the transformers folder of `model` (read from the checkpoint folder `source`) atomically: into a
    temporary sibling, then renamed into place."""
    out = Path(os.path.expanduser(str(out)))
    check_export_target(out, source, overwrite)
    hf = hf_model(model, tokenizer)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(tmp)
    tokenizer.save(tmp / "tokenizer.json")
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer, model.cfg.block_size), indent=2))
    (tmp / EXPORT_MARKER).write_text(f"written by lmtrain export from {source}\n")
    apply_umask(tmp)  # save_pretrained's safetensors files arrive as 0600
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    os.replace(tmp, out)
    return out
