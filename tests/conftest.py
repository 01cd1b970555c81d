"""Shared fixtures: a private token cache, a small corpus, a runner for the real CLI, tiny transformers folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Tests never reach the Hugging Face hub. huggingface_hub reads these when first imported, so they are
# set here, before any test module imports datasets.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

# Small enough to train on in seconds, large enough for a by-document split.
TINY_MODEL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.block_size=16"]
FAST_TRAIN = ["data.max_documents=150", "tokenizer.vocab_size=300", "trainer.batch_size=8", "trainer.eval_batches=2",
              "trainer.log_every=1", "trainer.progress=false",
              "trainer.precision=fp32"]  # auto would pick bf16 on some CPUs: tests compare figures across machines


QUIET_TRAIN = ["trainer.save_every=0", "trainer.sample_every=0", "trainer.eval_every=100"]  # the steps only

# The distributed CLI tests (tests/distributed/): 2 ranks x batch 4 train on the sequences 1 rank x batch 8 does.
# Every run stays inside the 30-step LR warm-up, where the LR does not depend on trainer.max_steps: a run started
# with a large max_steps (so that a signal reaches it mid-run) matches the 20-step reference step for step.
DIST_COMMON = [*TINY_MODEL, *(o for o in FAST_TRAIN if not o.startswith("trainer.batch_size=")),
               "trainer.eval_every=10", "trainer.save_every=10", "trainer.dist_timeout_s=30"]
ONE_RANK = [*DIST_COMMON, "trainer.batch_size=8", "trainer.max_steps=20"]  # 1 rank x 8
TWO_RANKS = [*DIST_COMMON, "trainer.batch_size=4", "trainer.max_steps=20"]  # 2 ranks x 4


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory) -> Path:
    """Every test shares one token cache of its own: nothing read from or written to ~/.cache."""
    cache = tmp_path_factory.mktemp("lmtrain-cache")
    os.environ["LMTRAIN_CACHE"] = str(cache)
    return cache


@pytest.fixture
def corpus(tmp_path) -> dict[str, Path]:
    """Plain-text train and validation files, and a jsonl file whose text sits under `content`."""
    words = "the quick brown fox jumps over the lazy dog while a small bird sings in the old tree".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(400)]
    train, val, jsonl = tmp_path / "train.txt", tmp_path / "val.txt", tmp_path / "docs.jsonl"
    train.write_text("\n".join(lines[:360]) + "\n")
    val.write_text("\n".join(lines[360:]) + "\n")
    jsonl.write_text("".join(f'{{"content": "{line}"}}\n' for line in lines))
    return {"train": train, "val": val, "jsonl": jsonl}


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600, input: str = ""):
    """Run `lmtrain ARGS` in a fresh process, as a user would, with `input` on stdin; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "lmtrain", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, input=input)


TORCHRUN = Path(sys.executable).parent / "torchrun"  # the one beside this interpreter
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # deterministic sums, and a tiny model gains nothing from threads


def start(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    """`lmtrain train ARGS` started in the background, one thread, output (stdout and stderr) readable as it comes."""
    return subprocess.Popen([sys.executable, "-m", "lmtrain", "train", *args], stdout=subprocess.PIPE, cwd=cwd,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **ONE_THREAD})


def read_until(proc: subprocess.Popen, *fragments: str) -> str:
    """Read the process's output until a line holds every fragment; returns all output read."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if all(f in line for f in fragments):
            return "".join(seen)
    raise AssertionError(f"the run ended before printing {fragments!r}:\n" + "".join(seen))


def make_trainer(run_dir: Path, *overrides: str):
    """A Trainer in this process, built as `lmtrain train` builds it, so a test can reach into its step."""
    from hydra import compose, initialize_config_module

    from lmtrain.config import register_configs, to_train_config
    from lmtrain.training.loop import Trainer
    from lmtrain.training.setup import build_parts

    register_configs()
    with initialize_config_module(config_module="lmtrain.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY_MODEL, *FAST_TRAIN, *QUIET_TRAIN, *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(build_parts(to_train_config(cfg), run_dir))


def free_port() -> int:
    """A TCP port nobody listens on now, for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_losses(run: Path) -> dict[int, float]:
    """A run's logged training loss at each step, from its metrics.jsonl."""
    from lmtrain.runs.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def assert_losses_match(run: Path, reference: Path, steps: range, tol: float) -> None:
    got, want = step_losses(run), step_losses(reference)
    assert sorted(got) == list(steps)
    for step in steps:
        assert abs(got[step] - want[step]) <= tol, (step, got[step], want[step])


@pytest.fixture(scope="session")
def one_rank_reference(tmp_path_factory) -> Path:
    """One process, batch 8, 20 steps: what the 2-rank runs of tests/distributed/ are compared with."""
    run = tmp_path_factory.mktemp("one") / "run"
    result = run_cli("train", *ONE_RANK, f"hydra.run.dir={run}", env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    return run


# Tiny Hugging Face model folders, built offline as a user's would be: a randomly initialised transformers model
# saved with `save_pretrained` (safetensors), a byte-level BPE tokenizer trained with `tokenizers` on a few lines
# and saved as the folder's tokenizer.json, with the tokenizer_config.json and special tokens a real folder has.
HF_TEXT = ("the quick brown fox jumps over the lazy dog while a small bird sings in the old tree\n"
        "def main(argv):\n    return sum(x * 2 for x in argv)  # héllo wörld\n")

# Per architecture: its transformers config (tiny: 2 layers, width 32, context 64), the special tokens of its
# tokenizer, the one its tokenizer puts before every text (as Llama's does), and the eos its
# tokenizer_config.json names. Between them they cover GQA, untied and tied heads, Llama 3's rope_scaling,
# biases on q/k/v alone, a padded vocabulary and an eos that is not lmtrain's first guess.
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}
FAMILIES = {
    "gpt2": dict(config=lambda transformers, v: transformers.GPT2Config(
        vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
        specials=["<|endoftext|>"], bos=None, eos="<|endoftext|>"),
    "llama": dict(config=lambda transformers, v: transformers.LlamaConfig(
        vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=LLAMA3_SCALING, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1),
        specials=["<|begin_of_text|>", "<|end_of_text|>"], bos="<|begin_of_text|>", eos="<|end_of_text|>"),
    "mistral": dict(config=lambda transformers, v: transformers.MistralConfig(
        vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, sliding_window=None, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1),
        specials=["<s>", "</s>", "<unk>"], bos="<s>", eos="</s>"),
    "qwen2": dict(config=lambda transformers, v: transformers.Qwen2Config(
        vocab_size=v + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=1000000.0, tie_word_embeddings=True,
        use_sliding_window=False, bos_token_id=None, eos_token_id=2),
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>", split=True),
}
# Qwen2's own pre-tokenizer, as its tokenizer.json has it (and as transformers 5 applies to any qwen2 folder)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
           "qwen2": "Qwen2ForCausalLM"}


def train_tokenizer(specials: list[str], bos: str | None, split: bool = False) -> Tokenizer:
    """A 300-token byte-level BPE; with `bos`, a post-processor that puts it before every text, as Llama's;
    with `split`, Qwen2's pre-tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]) if split else pre_tokenizers.ByteLevel(
        add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([HF_TEXT] * 20, trainer=trainer)
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight moved well away from its init (norms and biases too): a wrong mapping cannot hide."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def hf_folder(path: Path, family: str, tokenizer_file: bool = True) -> Path:
    """A tiny transformers folder of `family` at `path`: config.json, model.safetensors, tokenizer files."""
    transformers = pytest.importorskip("transformers")
    spec = FAMILIES[family]
    tokenizer = train_tokenizer(spec["specials"], spec["bos"], spec.get("split", False))
    config = spec["config"](transformers, tokenizer.get_vocab_size())
    model = perturbed(getattr(transformers, CLASSES[family])(config)).eval()
    model.save_pretrained(path)
    if tokenizer_file:
        tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": spec["bos"], "eos_token": spec["eos"],
        "model_max_length": 64, "clean_up_tokenization_spaces": False}))
    return path


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory) -> dict[str, Path]:
    """One tiny folder per architecture, built once per session (tests must not change them)."""
    root = tmp_path_factory.mktemp("hf")
    return {family: hf_folder(root / family, family) for family in FAMILIES}
