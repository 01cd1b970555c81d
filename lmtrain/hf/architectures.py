"""The transformers architectures lmtrain reads and writes, and one table of names for each.

An `Architecture` says which config.json key holds which `model.*` setting and which transformers tensors
hold which lmtrain tensor. Reading a transformers folder (load.py) and writing one (export.py) both go
through these tables and through the pair of functions below (`model_config`, `hf_config`), which sit side
by side so the two directions cannot drift apart:

    lmtrain                  GPT2LMHeadModel                 LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
    tok_emb                  transformer.wte                 model.embed_tokens
    pos_emb                  transformer.wpe                 (RoPE: no tensor)
    blocks.i.attn_norm       transformer.h.i.ln_1            model.layers.i.input_layernorm
    blocks.i.attn.qkv        ...attn.c_attn (transposed)     ...self_attn.q_proj | k_proj | v_proj (rows stacked)
    blocks.i.attn.proj       ...attn.c_proj (transposed)     ...self_attn.o_proj
    blocks.i.mlp_norm        ...ln_2                         ...post_attention_layernorm
    blocks.i.mlp.fc          ...mlp.c_fc (transposed)        -
    blocks.i.mlp.fc_gate     -                               ...mlp.gate_proj
    blocks.i.mlp.fc_up       -                               ...mlp.up_proj
    blocks.i.mlp.proj        ...mlp.c_proj (transposed)      ...mlp.down_proj
    norm_f, lm_head          transformer.ln_f, lm_head       model.norm, lm_head

Mistral and Qwen2 are Llama's computation with other switches: no biases, or biases on q/k/v alone
(model.qkv_bias), and a sliding window that a context no longer than the window never reaches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lmtrain.config import Mlp, ModelConfig, Norm, PosEmb, RopeScaling, RopeScalingKind
from lmtrain.errors import CheckpointError, ConfigError

GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # GPT-2's GELU, tanh approximation: lmtrain's model.mlp=gelu


@dataclass(frozen=True)
class Architecture:
    name: str  # the transformers class, as config.json's "architectures" names it
    model_type: str  # config.json's "model_type"
    settings: dict[str, str]  # model.* field -> the config.json key that holds it
    defaults: dict[str, object]  # config.json values transformers assumes where a file leaves a key out
    base: str  # prefix of the base model's tensors; some files leave it out (the hub's gpt2)
    tensors: dict[str, str]  # lmtrain module outside the blocks -> transformers'
    layer: str  # prefix of block i's tensors
    block: dict[str, tuple[str, ...]]  # lmtrain module in a block -> transformers' (several: rows stacked)
    transposed: bool = False  # the blocks' matrices stored (in, out), as GPT-2's Conv1D, not (out, in) as nn.Linear
    ignored: tuple[str, ...] = ()  # suffixes of tensors older files hold that are buffers, not weights
    biases: dict[str, bool] = field(default_factory=dict)  # model.bias, model.qkv_bias every model of it has


GPT2 = Architecture(
    name="GPT2LMHeadModel", model_type="gpt2",
    settings={"vocab_size": "vocab_size", "d_model": "n_embd", "n_layers": "n_layer", "n_heads": "n_head",
              "d_ff": "n_inner", "block_size": "n_positions", "norm_eps": "layer_norm_epsilon",
              "dropout": "resid_pdrop", "tie_embeddings": "tie_word_embeddings"},
    defaults={"n_positions": 1024, "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.1, "tie_word_embeddings": True,
              "activation_function": "gelu_new", "n_inner": None},
    base="transformer.",
    tensors={"tok_emb": "transformer.wte", "pos_emb": "transformer.wpe", "norm_f": "transformer.ln_f",
             "lm_head": "lm_head"},
    layer="transformer.h.{i}.",
    block={"attn_norm": ("ln_1",), "attn.qkv": ("attn.c_attn",), "attn.proj": ("attn.c_proj",),
           "mlp_norm": ("ln_2",), "mlp.fc": ("mlp.c_fc",), "mlp.proj": ("mlp.c_proj",)},
    transposed=True,
    ignored=(".attn.bias", ".attn.masked_bias"),  # the causal mask older transformers saved with the weights
    biases={"bias": True},
)

LLAMA = Architecture(
    name="LlamaForCausalLM", model_type="llama",
    settings={"vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
              "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "d_ff": "intermediate_size",
              "block_size": "max_position_embeddings", "norm_eps": "rms_norm_eps", "dropout": "attention_dropout",
              "tie_embeddings": "tie_word_embeddings"},
    defaults={"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "attention_dropout": 0.0,
              "tie_word_embeddings": False, "hidden_act": "silu", "rope_theta": 10000.0, "attention_bias": False,
              "mlp_bias": False},
    base="model.",
    tensors={"tok_emb": "model.embed_tokens", "norm_f": "model.norm", "lm_head": "lm_head"},
    layer="model.layers.{i}.",
    block={"attn_norm": ("input_layernorm",),
           "attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "attn.proj": ("self_attn.o_proj",), "mlp_norm": ("post_attention_layernorm",),
           "mlp.fc_gate": ("mlp.gate_proj",), "mlp.fc_up": ("mlp.up_proj",), "mlp.proj": ("mlp.down_proj",)},
    ignored=(".rotary_emb.inv_freq",),  # RoPE's frequencies, which older transformers saved
)
MISTRAL = dataclasses.replace(LLAMA, name="MistralForCausalLM", model_type="mistral",
                              defaults={**LLAMA.defaults, "sliding_window": 4096}, biases={"bias": False})
QWEN2 = dataclasses.replace(LLAMA, name="Qwen2ForCausalLM", model_type="qwen2",
                            defaults={**LLAMA.defaults, "use_sliding_window": False},
                            biases={"bias": False, "qkv_bias": True})
ARCHITECTURES = {a.name: a for a in (GPT2, LLAMA, MISTRAL, QWEN2)}
SUPPORTED = ", ".join(ARCHITECTURES)


def hf_names(arch: Architecture, name: str) -> list[str]:
    """The transformers tensors that hold lmtrain tensor `name` (e.g. blocks.3.attn.qkv.weight): one, or, for
    a fused lmtrain projection, several whose rows it stacks."""
    module, kind = name.rsplit(".", 1)
    if module.startswith("blocks."):
        _, i, inner = module.split(".", 2)
        return [f"{arch.layer.format(i=i)}{theirs}.{kind}" for theirs in arch.block[inner]]
    return [f"{arch.tensors[module]}.{kind}"]


def transposed(arch: Architecture, name: str, dims: int) -> bool:
    """Whether transformers stores lmtrain tensor `name` (of `dims` dimensions) transposed: GPT-2's Conv1D."""
    return arch.transposed and dims == 2 and name.startswith("blocks.")


def architecture_of(config: dict, where: str) -> Architecture:
    """The architecture a config.json names; anything else is refused, naming it and what lmtrain reads."""
    named = (config.get("architectures") or [None])[0]
    arch = ARCHITECTURES.get(named) or next((a for a in ARCHITECTURES.values()
                                            if named is None and a.model_type == config.get("model_type")), None)
    if arch is None:
        raise CheckpointError(f"{where}: its architecture {named or config.get('model_type')!r} is not one lmtrain "
                              f"can load; it loads {SUPPORTED}")
    return arch


def model_config(config: dict, name: str, where: str) -> tuple[ModelConfig, Architecture, int | None]:
    """The ModelConfig a transformers config.json describes, its architecture, and its sliding window (None:
    none). Settings lmtrain's model cannot compute are refused by name."""
    arch = architecture_of(config, where)

    def value(key: str) -> object:
        return config.get(key, arch.defaults.get(key))

    settings = {ours: value(theirs) for ours, theirs in arch.settings.items()} | arch.biases

    def refuse(setting: str, instead: str = "") -> CheckpointError:
        return CheckpointError(f"{where}: {arch.name} with {setting} computes something lmtrain's model does not"
                               + (f"; lmtrain has {instead}" if instead else ""))

    if arch is GPT2:
        activation = value("activation_function")
        if activation not in (*GELU_TANH, "relu2"):
            raise refuse(f"activation_function={activation!r}", f"{' or '.join(GELU_TANH)}, and relu2")
        for key, expected in [("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)]:
            if config.get(key, expected) != expected:
                raise refuse(f"{key}={config[key]}")
        settings["d_ff"] = settings["d_ff"] or 4 * settings["d_model"]
        parts = dict(pos_emb=PosEmb.learned, norm=Norm.layernorm, mlp=Mlp.relu2 if activation == "relu2" else Mlp.gelu)
        window = None
    else:
        if value("hidden_act") != "silu":
            raise refuse(f"hidden_act={value('hidden_act')!r}", "silu (SwiGLU)")
        head_dim = config.get("head_dim")
        if head_dim not in (None, settings["d_model"] // settings["n_heads"]):
            raise refuse(f"head_dim={head_dim}, not hidden_size / num_attention_heads")
        if arch is LLAMA:
            if value("mlp_bias") != value("attention_bias"):
                raise refuse(f"attention_bias={value('attention_bias')} but mlp_bias={value('mlp_bias')}")
            settings["bias"] = value("attention_bias")
        if settings.get("n_kv_heads") in (None, settings["n_heads"]):
            settings["n_kv_heads"] = None
        settings["rope_theta"], settings["rope_scaling"] = rope_settings(config, arch, refuse)
        window = sliding_window(config, arch)
        if window is not None:
            settings["block_size"] = min(settings["block_size"], window)
        parts = dict(pos_emb=PosEmb.rope, norm=Norm.rmsnorm, mlp=Mlp.swiglu)
    return ModelConfig(name=name, **settings, **parts), arch, window


def rope_settings(config: dict, arch: Architecture, refuse) -> tuple[float, RopeScaling]:
    """RoPE's base and scaling, from transformers 4's rope_theta and rope_scaling or 5's rope_parameters."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", arch.defaults["rope_theta"]))
    scaling = config.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise refuse(f"partial_rotary_factor={partial}")
    if kind == "default":
        return float(theta), RopeScaling()
    if kind != RopeScalingKind.llama3.value:
        raise refuse(f"rope_scaling of type {kind!r}", "llama3")
    return float(theta), RopeScaling(kind=RopeScalingKind.llama3, factor=float(scaling["factor"]),
                                     low_freq_factor=float(scaling["low_freq_factor"]),
                                     high_freq_factor=float(scaling["high_freq_factor"]),
                                     original_max_positions=int(scaling["original_max_position_embeddings"]))


def sliding_window(config: dict, arch: Architecture) -> int | None:
    """The attention window of a config that uses one (Mistral's sliding_window; Qwen2's with
    use_sliding_window); None when every position sees every earlier one."""
    if arch is QWEN2 and not config.get("use_sliding_window", arch.defaults["use_sliding_window"]):
        return None
    window = config.get("sliding_window", arch.defaults.get("sliding_window"))
    return int(window) if window else None


def export_architecture(cfg: ModelConfig) -> Architecture:
    """The transformers architecture that computes exactly what this model does; what none does is refused."""
    if cfg.qk_norm:
        raise ConfigError("export format=hf: model.qk_norm=true has no counterpart in GPT-2 or Llama")
    if cfg.logit_softcap > 0:
        raise ConfigError(f"export format=hf: model.logit_softcap={cfg.logit_softcap} has no counterpart in GPT-2 or "
                          "Llama, which would compute other logits; train with model.logit_softcap=0 to export")
    parts = (cfg.pos_emb, cfg.norm, cfg.mlp)
    qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
    if parts in ((PosEmb.learned, Norm.layernorm, Mlp.gelu), (PosEmb.learned, Norm.layernorm, Mlp.relu2)):
        if cfg.n_kv_heads not in (None, cfg.n_heads):
            raise ConfigError(f"export format=hf: GPT-2 has no grouped-query attention (model.n_kv_heads="
                              f"{cfg.n_kv_heads}, model.n_heads={cfg.n_heads})")
        if qkv_bias != cfg.bias and qkv_bias:
            raise ConfigError("export format=hf: GPT-2 has biases everywhere or nowhere, not model.qkv_bias=true "
                              "with model.bias=false")
        return GPT2
    if parts == (PosEmb.rope, Norm.rmsnorm, Mlp.swiglu):
        if qkv_bias == cfg.bias:
            return LLAMA
        if qkv_bias:
            return QWEN2
        raise ConfigError("export format=hf: model.qkv_bias=false with model.bias=true (biases on the output and MLP "
                          "projections alone) is neither Llama nor Qwen2")
    pos_emb, norm, mlp = PosEmb(cfg.pos_emb).value, Norm(cfg.norm).value, Mlp(cfg.mlp).value
    raise ConfigError(f"export format=hf: model.pos_emb={pos_emb}, model.norm={norm}, model.mlp={mlp} is neither "
                      "GPT-2 (learned, layernorm, gelu or relu2) nor Llama (rope, rmsnorm, swiglu)")


def hf_config(cfg: ModelConfig, arch: Architecture) -> dict:
    """The transformers config values (keyword arguments of its config class) for this model: `model_config`'s
    inverse. The keys transformers 4 and 5 both accept (rope_theta, rope_scaling)."""
    values = {theirs: getattr(cfg, ours) for ours, theirs in arch.settings.items()}
    if arch is GPT2:
        values.update(activation_function="relu2" if cfg.mlp == Mlp.relu2 else GELU_TANH[0],
                      embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)
        return values
    values.update(num_key_value_heads=cfg.n_kv_heads or cfg.n_heads, hidden_act="silu", rope_theta=cfg.rope_theta)
    if arch is LLAMA:
        values.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    if arch is QWEN2:
        values.update(use_sliding_window=False)
    if cfg.rope_scaling.kind != RopeScalingKind.none:
        s = cfg.rope_scaling
        values["rope_scaling"] = {"rope_type": s.kind.value, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                                  "high_freq_factor": s.high_freq_factor,
                                  "original_max_position_embeddings": s.original_max_positions}
    return values
