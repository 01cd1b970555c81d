"""Reading Hugging Face transformers folders: lmtrain computes transformers' logits (fp32, within 1e-4) for every
architecture it reads, tokenizes as transformers' tokenizer does, and refuses by name what it cannot load."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from lmtrain.config import RopeScaling, TokenizerKind
from lmtrain.config.model import longest_context
from lmtrain.data.prepare import prepare_data
from lmtrain.errors import CheckpointError
from lmtrain.hf.load import read_folder
from lmtrain.model.generation import encode_prompt
from lmtrain.runs.trained import load_trained, starting_point

from conftest import CLASSES, FAMILIES, HF_TEXT, hf_folder

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family", FAMILIES)
def test_an_imported_model_computes_transformers_logits_and_tokens(hf_folders, family):
    folder = hf_folders[family]
    trained = load_trained(folder, torch.device("cpu"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(theirs).__name__ == CLASSES[family]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = encode_prompt(trained.tokenizer, HF_TEXT)  # Llama's and Mistral's start with their begin-of-text token
    assert ids == hf_tokenizer(HF_TEXT)["input_ids"]
    assert trained.tokenizer.eot_token == FAMILIES[family]["eos"]  # tokenizer_config.json's, even qwen2's <|im_end|>
    idx = torch.tensor([ids[:48], ids[-48:]])
    with torch.no_grad():
        ours, reference = trained.model(idx), theirs(idx).logits
    assert ours.std() > 0.5  # far from zero, so a wrong mapping could not hide
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)


def test_llama3_rope_scaling_is_computed_not_dropped(hf_folders):
    """The llama folder's rope_scaling changes its logits: the agreement above covers the scaling itself."""
    trained = load_trained(hf_folders["llama"], torch.device("cpu"))
    unscaled = read_folder(hf_folders["llama"], "checkpoint")
    unscaled.model.rope_scaling = RopeScaling()  # kind none
    idx = torch.tensor([encode_prompt(trained.tokenizer, HF_TEXT)[:48]])
    with torch.no_grad():
        assert (trained.model(idx) - unscaled.build_model()(idx)).abs().max() > 1e-2


def test_the_sharded_form_and_the_hubs_unprefixed_names_load_alike(hf_folders, tmp_path):
    """Shards listed by model.safetensors.index.json, and GPT-2 names without `transformer.` (as the hub's gpt2)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "gpt2"
    shutil.copytree(hf_folders["gpt2"], folder)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n.removeprefix("transformer."): tensors[n] for n in part}, str(folder / file), {"format": "pt"})
        weight_map |= {n.removeprefix("transformer."): file for n in part}
    weight_map["h.0.attn.bias"] = file  # the causal mask older transformers kept among the weights: skipped
    save_file({**{n.removeprefix("transformer."): tensors[n] for n in halves[file]},
               "h.0.attn.bias": torch.ones(1, 1, 64, 64)}, str(folder / file), {"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    idx = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        whole = load_trained(hf_folders["gpt2"], torch.device("cpu")).model(idx)
        torch.testing.assert_close(load_trained(folder, torch.device("cpu")).model(idx), whole, rtol=0, atol=0)


def test_the_training_data_starts_each_document_with_the_models_begin_of_text(hf_folders, corpus):
    """Llama's tokenizer puts <|begin_of_text|> before every text: the token cache does too, after each end."""
    from lmtrain.config import DataConfig, SourceKind

    point = starting_point(str(hf_folders["llama"]), "model.init_from")
    data = DataConfig(name="records", source=SourceKind.text_files, train_files=[str(corpus["jsonl"])],
                      text_column="content", cache_dir=os.environ["LMTRAIN_CACHE"])  # a document per record
    prepared = prepare_data(data, point.tokenizer)
    tokens = next(iter(prepared.caches.values())).shards("train")[0]
    bos, eot = prepared.tokenizer.bos_id, prepared.tokenizer.eot_id
    assert point.tokenizer.kind == TokenizerKind.file and tokens[0] == bos
    ends = [i for i, t in enumerate(tokens[:-1]) if t == eot]
    assert len(ends) > 100 and all(tokens[i + 1] == bos for i in ends)


def write_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("family, changes, message", [
    ("gpt2", {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"},
     "its architecture 'GPTNeoXForCausalLM' is not one lmtrain can load; it loads GPT2LMHeadModel, LlamaForCausalLM"),
    ("gpt2", {"activation_function": "gelu"}, "GPT2LMHeadModel with activation_function='gelu' computes something"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "with scale_attn_by_inverse_layer_idx=True"),
    ("llama", {"head_dim": 16}, "with head_dim=16, not hidden_size / num_attention_heads"),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None},
     "rope_scaling of type 'yarn'"),
    ("llama", {"attention_bias": True}, "with attention_bias=True but mlp_bias=False"),
    ("llama", {"intermediate_size": 128}, r"its weights do not fit its config.json \(6 problems\): .*mlp.gate_proj"),
])
def test_what_lmtrain_cannot_compute_is_refused_by_name(hf_folders, tmp_path, family, changes, message):
    folder = tmp_path / family
    shutil.copytree(hf_folders[family], folder)
    write_config(folder, **changes)
    with pytest.raises(CheckpointError, match=message):
        read_folder(folder, "model.init_from=x")


def test_a_sliding_window_caps_the_context_that_computes_the_same(hf_folders, tmp_path):
    folder = tmp_path / "mistral"
    shutil.copytree(hf_folders["mistral"], folder)
    write_config(folder, sliding_window=32)
    hf = read_folder(folder, "checkpoint")
    assert hf.model.block_size == 32 and longest_context(hf.model, hf.window) == (32, "its sliding window of 32 "
                                                                                    "positions")
    qwen = read_folder(hf_folders["qwen2"], "checkpoint")  # a sliding_window key without use_sliding_window
    assert qwen.window is None and longest_context(qwen.model, qwen.window) is None


def test_pickled_weights_and_a_missing_tokenizer_are_refused_saying_what_to_do(hf_folders, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(hf_folders["gpt2"], pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(CheckpointError, match=r"its weights are in pytorch_model.bin, a pickle that lmtrain never "
                                              r"loads .*save_pretrained\('.*pickled-safetensors'\)"):
        read_folder(pickled, "model.init_from=x")
    bare = hf_folder(tmp_path / "bare", "gpt2", tokenizer_file=False)
    with pytest.raises(CheckpointError, match=r"it has no tokenizer.json .*AutoTokenizer"):
        read_folder(bare, "model.init_from=x")
