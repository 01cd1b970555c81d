"""Published weights through the real CLI: `lmtrain train model.init_from=<transformers folder>` trains further from
them with the model's own shape and tokenizer, its export loads back in transformers with the same logits, eval and
generate use a folder as it is, and every mistake is one line with exit status 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmtrain.runs.metrics import read_metrics
from lmtrain.runs.trained import load_trained

from conftest import CLASSES, FAMILIES, FAST_TRAIN, QUIET_TRAIN, run_cli

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

# a few steps at a fine-tuning learning rate, the model's own shape: no TINY_MODEL, which would conflict
TRAIN = [*FAST_TRAIN, *QUIET_TRAIN, "trainer.max_steps=10", "trainer.batch_size=4", "optimizer.lr=3e-3",
         "scheduler.warmup_steps=2", "model.block_size=32"]
EXPORTED_AS = {**CLASSES, "mistral": "LlamaForCausalLM"}  # Mistral without a sliding window computes as Llama


def data(corpus) -> list[str]:
    return ["data=text_files", f"data.train_files=[{corpus['jsonl']}]", "data.text_column=content"]


def error_line(result) -> str:
    """The one ERROR line a refused command prints; nothing else of it, and no traceback."""
    out = result.stdout + result.stderr
    lines = [line for line in out.splitlines() if "ERROR" in line]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in out, out
    return lines[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_training_from_a_folder_lowers_the_loss_and_exports_back_to_transformers(hf_folders, corpus, tmp_path,
                                                                                 family):
    folder = hf_folders[family]
    result = run_cli("train", f"model.init_from={folder}", *data(corpus), *TRAIN, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    losses = [r["loss"] for r in read_metrics(tmp_path / "run/metrics.jsonl") if "loss" in r]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.3, losses
    saved = json.loads((tmp_path / "run/checkpoints/final/config.json").read_text())
    hf_config = json.loads((folder / "config.json").read_text())
    assert saved["model"]["d_model"] == hf_config.get("hidden_size", hf_config.get("n_embd")) == 32
    assert saved["model"]["block_size"] == 32 and saved["tokenizer"]["eot_token"] == FAMILIES[family]["eos"]

    result = run_cli("export", "checkpoint=run", "out=exported", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    assert type(exported).__name__ == EXPORTED_AS[family]
    trained = load_trained(tmp_path / "run", torch.device("cpu"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    ids = tokenizer("the quick brown fox jumps over the lazy dog while a small bird")["input_ids"]
    idx = torch.tensor([ids[:32]])
    with torch.no_grad():
        torch.testing.assert_close(exported(idx).logits, trained.model(idx), rtol=0, atol=1e-4)


def test_eval_and_generate_use_a_folder_without_training(hf_folders, corpus, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(hf_folders["llama"], folder)
    result = run_cli("eval", f"checkpoint={folder}", *data(corpus), "max_tokens=200", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((folder / "eval_text_files_val.json").read_text())
    assert report["tokens"] == 200 and report["loss"] > 0 and report["bits_per_byte"] > 0
    result = run_cli("generate", f"checkpoint={folder}", "prompt=the quick", "max_new_tokens=5", "temperature=0",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("the quick") and "5 tokens" in result.stderr


def test_mistakes_are_one_line_and_exit_2(hf_folders, corpus, tmp_path):
    """A pickled-only folder, an architecture lmtrain cannot load, an override that contradicts the model, a folder
    without its tokenizer.json: each refused before any data is read, in one line."""
    pickled, other, bare = (tmp_path / name for name in ("pickled", "other", "bare"))
    for target in (pickled, other, bare):
        shutil.copytree(hf_folders["gpt2"], target)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"],
                                                   "model_type": "bert"}))
    (bare / "tokenizer.json").unlink()
    cases = [
        (pickled, [], "its weights are in pytorch_model.bin, a pickle that lmtrain never loads"),
        (other, [], "its architecture 'BertForMaskedLM' is not one lmtrain can load; it loads GPT2LMHeadModel"),
        (hf_folders["gpt2"], ["model.n_layers=3", "model.d_model=32"],
         "sets the model's shape, and these settings differ from it: model.n_layers=3 (the checkpoint's is 2); drop"),
        (hf_folders["gpt2"], ["model.block_size=128"], "model.block_size=128 is longer than its 64 learned positions"),
        (bare, [], "it has no tokenizer.json"),
    ]
    for folder, overrides, message in cases:
        result = run_cli("train", f"model.init_from={folder}", *data(corpus), *FAST_TRAIN, *overrides,
                         "hydra.run.dir=run", cwd=tmp_path)
        assert message in error_line(result)
        assert not (tmp_path / "run").exists()  # refused before the run folder was kept, before any data


@pytest.mark.parametrize("env", [{}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "no-network"])
def test_a_hub_id_not_cached_fails_in_one_line_saying_how_to_bring_it(tmp_path, env):
    env = {**env, "HF_HOME": str(tmp_path / "hf-home")}  # an empty hub cache
    for command in (["train", "model.init_from=hf:openai-community/gpt2"], ["generate", "checkpoint=hf:gpt2"]):
        result = run_cli(*command, cwd=tmp_path, env=env, timeout=60)
        line = error_line(result)
        assert "is not in the Hugging Face cache" in line and "copy that folder here and give it" in line


@pytest.mark.parametrize("recipe, family, hub_id", [("gpt2_finetune", "gpt2", "hf:openai-community/gpt2"),
                                                    ("smollm2_finetune", "llama", "hf:HuggingFaceTB/SmolLM2-135M")])
def test_the_finetuning_recipes_name_their_hub_model_and_run_from_a_local_copy(hf_folders, corpus, tmp_path, recipe,
                                                                               family, hub_id):
    shown = run_cli("train", f"experiment={recipe}", "data.train_files=[my.txt]", "--cfg", "job", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert f"  init_from: {hub_id}\n" in shown.stdout and "  warmup_steps: " in shown.stdout
    run = run_cli("train", f"experiment={recipe}", f"model.init_from={hf_folders[family]}", *data(corpus), *FAST_TRAIN,
                  *QUIET_TRAIN, "trainer.max_steps=2", "trainer.batch_size=4", "trainer.grad_accum_steps=1",
                  "model.block_size=32", "hydra.run.dir=run", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    model = json.loads((tmp_path / "run/checkpoints/final/config.json").read_text())["model"]
    assert model["d_model"] == 32 and model["dropout"] == 0.0 and model["block_size"] == 32
