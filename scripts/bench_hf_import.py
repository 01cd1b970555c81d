"""Import a Hugging Face transformers folder and measure it: the wall time and peak memory (RSS) of loading it
into lmtrain, beside transformers' own `from_pretrained`, and the largest logit difference between the two.

    python scripts/bench_hf_import.py                      # GPT2Config(): GPT-2 small, 124M, fp32 safetensors
    python scripts/bench_hf_import.py --model tinyllama    # LlamaForCausalLM 1.1B (TinyLlama's shape), bf16

The folder is built here, offline: the transformers model randomly initialised from its config and saved with
`save_pretrained` (safetensors), with a small byte-level BPE tokenizer.json (lmtrain needs one; its size does
not matter here). Each load runs in a fresh process, so its peak RSS is its own: the process's RSS after its
imports (torch, transformers) is given too, and the difference is what the load itself held at its peak.
lmtrain's model is float32; so is transformers' here (dtype=float32), so the two hold the same weights.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {  # name: (transformers class, config keyword arguments, dtype saved)
    "gpt2": ("GPT2LMHeadModel", {}, "float32"),
    "tinyllama": ("LlamaForCausalLM", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                           max_position_embeddings=2048, rms_norm_eps=1e-5), "bfloat16"),
}


def rss_mb() -> float:
    """This process's peak resident set so far, in MB (ru_maxrss is in KB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def build(folder: Path, name: str) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    cls, kwargs, dtype = MODELS[name]
    config = getattr(transformers, cls.replace("LMHeadModel", "Config").replace("ForCausalLM", "Config"))(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, cls)._from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


def measure(folder: Path, loader: str) -> dict:
    """Runs in a fresh process: import, then load `folder` with `loader` (lmtrain or transformers), then one
    forward pass (transformers may leave weights in the file's memory map until they are first read)."""
    import torch

    if loader == "lmtrain":
        from lmtrain.config import ModelConfig
        from lmtrain.model import GPT
        from lmtrain.runs.trained import load_trained

        with torch.device("meta"):  # torch imports its meta-device code on first use: not part of the load
            GPT(ModelConfig(vocab_size=8, d_model=8, n_heads=2, n_layers=1, d_ff=8, block_size=8))

        def load():
            return load_trained(folder, torch.device("cpu")).model
    else:
        import transformers

        def load():
            return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    before = current_rss_mb()
    start = time.perf_counter()
    model = load()
    seconds, loaded = time.perf_counter() - start, rss_mb()
    with torch.no_grad():
        model(torch.zeros(1, 64, dtype=torch.long))
    params = sum(p.numel() for p in model.parameters())
    return {"seconds": seconds, "rss_before_mb": before, "peak_loaded_mb": loaded, "peak_forward_mb": rss_mb(),
            "params": params}


def compare(folder: Path) -> dict:
    """Runs in a fresh process: both models on the same tokens, fp32; the largest logit difference."""
    import torch
    import transformers

    from lmtrain.runs.trained import load_trained

    ours = load_trained(folder, torch.device("cpu")).model
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.manual_seed(1)
    idx = torch.randint(0, ours.cfg.vocab_size, (2, 128))
    with torch.no_grad():
        a, b = ours(idx), theirs(idx).logits
    return {"max_abs_diff": (a - b).abs().max().item(), "logit_std": b.std().item()}


def in_fresh_process(step: str, folder: Path, loader: str = "") -> dict:
    out = subprocess.run([sys.executable, __file__, "--step", step, "--folder", str(folder), "--loader", loader],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="gpt2")
    parser.add_argument("--step", choices=["measure", "compare"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--loader", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step == "measure":
        print(json.dumps(measure(args.folder, args.loader)))
        return
    if args.step == "compare":
        print(json.dumps(compare(args.folder)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / args.model
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"import bench_hf_import as b; from pathlib import Path; b.build(Path({str(folder)!r}), "
                        f"{args.model!r})"], check=True, capture_output=True)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
        print(f"{args.model}: {MODELS[args.model][0]}, safetensors {size:,.0f} MB ({MODELS[args.model][2]})")
        for loader in ("lmtrain", "transformers"):
            r = in_fresh_process("measure", folder, loader)
            print(f"  {loader:12s} load {r['seconds']:6.2f} s   peak RSS {r['peak_loaded_mb']:7,.0f} MB loaded, "
                  f"{r['peak_forward_mb']:7,.0f} MB after a forward (from {r['rss_before_mb']:,.0f} MB after "
                  f"imports: {r['peak_loaded_mb'] - r['rss_before_mb']:,.0f} and "
                  f"{r['peak_forward_mb'] - r['rss_before_mb']:,.0f} MB more)")
        print(f"  the weights in fp32: {r['params'] / 1e6:,.1f}M parameters = {r['params'] * 4 / 2**20:,.0f} MB")
        c = in_fresh_process("compare", folder)
        print(f"  logits, fp32, 2 x 128 random tokens: max |lmtrain - transformers| = {c['max_abs_diff']:.2e} "
              f"(logit std {c['logit_std']:.2f})")


if __name__ == "__main__":
    main()
