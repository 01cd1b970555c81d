"""A checkpoint as a Hugging Face transformers folder (`lmtrain export format=hf`).

GPT presets (learned positions, LayerNorm, GELU or squared ReLU, full multi-head attention) become
GPT2LMHeadModel; Llama-style models (RoPE, RMSNorm, SwiGLU, grouped-query attention) become
LlamaForCausalLM, or Qwen2ForCausalLM with biases on q/k/v alone. The folder holds config.json,
model.safetensors, generation_config.json, and the tokenizer as tokenizer.json plus tokenizer_config.json,
so AutoModelForCausalLM and AutoTokenizer load it. lmtrain's weight layout was chosen for this (see
lmtrain/model/gpt.py): the mapping (architectures.py, the same tables import reads) renames, transposes for
GPT-2's Conv1D, and slices the fused qkv projection; it never permutes. Anything else is refused, naming
the setting.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor

from lmtrain.config import ModelConfig
from lmtrain.data.tokenizer import PAD, UNKNOWN, TextTokenizer
from lmtrain.errors import ConfigError
from lmtrain.files import apply_umask
from lmtrain.hf.architectures import Architecture, export_architecture, hf_config, hf_names, transposed
from lmtrain.model import GPT
from lmtrain.model.weights import model_tensors


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers class that computes exactly what this model does (refusing what none does)."""
    return export_architecture(cfg).name


def hf_tensors(weights: dict[str, Tensor], cfg: ModelConfig, arch: Architecture) -> dict[str, Tensor]:
    """The transformers model's tensors: each lmtrain tensor renamed by the architecture's table, transposed
    for GPT-2's Conv1D, and a fused q/k/v projection cut into its rows."""
    hs = cfg.d_model // cfg.n_heads
    rows = [cfg.n_heads * hs, (cfg.n_kv_heads or cfg.n_heads) * hs, (cfg.n_kv_heads or cfg.n_heads) * hs]
    out = {}
    for name, tensor in weights.items():
        theirs = hf_names(arch, name)
        parts = tensor.split(rows) if len(theirs) == 3 else [tensor]
        for hf_name, part in zip(theirs, parts, strict=True):
            out[hf_name] = (part.t() if transposed(arch, name, part.dim()) else part).contiguous()
    return out


def hf_model(model: GPT, tokenizer: TextTokenizer):
    """The transformers model (on the CPU, fp32) that computes what the lmtrain model does."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("export format=hf needs transformers: pip install 'lmtrain[hf]'") from None
    cfg: ModelConfig = model.cfg
    arch = export_architecture(cfg)
    pad_id = tokenizer.tokenizer.token_to_id(PAD)
    bos_id = tokenizer.eot_id if tokenizer.bos_id is None else tokenizer.bos_id
    config = transformers.AutoConfig.for_model(arch.model_type, architectures=[arch.name], **hf_config(cfg, arch),
                                               bos_token_id=bos_id, eos_token_id=tokenizer.eot_id, pad_token_id=pad_id)
    weights = {k: v.float() for k, v in model_tensors(model).items()}
    for name in ("tok_emb.weight", "lm_head.weight"):  # without the model.vocab_multiple padding rows
        if name in weights:
            weights[name] = weights[name][:cfg.vocab_size]
    state = hf_tensors(weights, cfg, arch)
    if cfg.tie_embeddings:  # transformers keeps the tie; the key is there for a strict load
        state["lm_head.weight"] = state[hf_names(arch, "tok_emb.weight")[0]]
    hf = getattr(transformers, arch.name)(config)
    if arch.biases.get("bias"):  # GPT-2 always has biases: without model.bias they are zeros, which computes the same
        state |= {k: torch.zeros_like(v) for k, v in hf.state_dict().items() if k not in state and k.endswith(".bias")}
    hf.load_state_dict(state, strict=True)  # strict: every tensor of the transformers model is mapped
    return hf.eval()


def tokenizer_config(tok: TextTokenizer, block_size: int) -> dict:
    """tokenizer_config.json: AutoTokenizer builds a fast tokenizer from tokenizer.json with these specials."""
    present = lambda token: tok.tokenizer.token_to_id(token) is not None
    bos = tok.eot_token if tok.bos_id is None else tok.tokenizer.id_to_token(tok.bos_id)
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": tok.eot_token,
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
