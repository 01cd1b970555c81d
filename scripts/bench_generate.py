"""Generation speed with and without the KV cache, from a prompt that fills `--context` tokens.

    flock /tmp/lmtrain-bench.lock python scripts/bench_generate.py --model gpt_small --context 512 --new 32

Builds the preset with random weights (speed does not depend on their values) and a context window of
context + new tokens, then times greedy generation of `new` tokens both ways, side by side in this one
process, and checks both produce the same tokens. Prints one table row per mode.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lmtrain.config import ModelConfig
from lmtrain.model import GPT
from lmtrain.model.generation import generate_tokens

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "model"


def build(preset: str, block_size: int, vocab_size: int, device: str) -> GPT:
    values = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(PRESETS / f"{preset}.yaml").model,
                             {"block_size": block_size, "vocab_size": vocab_size})
    torch.manual_seed(0)
    return GPT(OmegaConf.to_object(values)).to(device).eval()


def timed(model: GPT, prompt: list[int], new: int, use_cache: bool) -> tuple[list[int], float, float]:
    """The tokens, the seconds to the first one (reading the prompt), and the seconds for all of them."""
    tokens, start, first = [], time.perf_counter(), 0.0
    for token in generate_tokens(model, prompt, new, temperature=0, use_cache=use_cache):
        tokens.append(token)  # int(token) inside the loop already waited for the device
        first = first or time.perf_counter() - start
    return tokens, first, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt_small", help="a preset in configs/model/")
    parser.add_argument("--context", type=int, default=512, help="prompt tokens: the context at the first step")
    parser.add_argument("--new", type=int, default=32, help="tokens to generate")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model = build(args.model, args.context + args.new, args.vocab, args.device)
    prompt = torch.randint(0, args.vocab, (args.context,), generator=torch.Generator().manual_seed(0)).tolist()
    timed(model, prompt[:16], 4, True)  # warm-up: first calls allocate
    print(f"{args.model} ({model.num_params() / 1e6:.1f}M parameters, vocab {args.vocab}) on {args.device}, "
          f"{torch.get_num_threads()} threads: {args.new} new tokens after a {args.context}-token prompt", flush=True)
    results = {}
    for use_cache in (True, False):  # each mode's line as soon as it is measured: the uncached one is slow
        tokens, first, seconds = results[use_cache] = timed(model, prompt, args.new, use_cache)
        rest = (args.new - 1) / (seconds - first)
        print(f"  {'with' if use_cache else 'without'} KV cache: {args.new / seconds:8.1f} tokens/s overall "
              f"({seconds:.2f} s); first token after {first:.2f} s, then {rest:.1f} tokens/s", flush=True)
    assert results[True][0] == results[False][0], "the cache changed the greedy tokens"
    print(f"  speed-up: {results[False][2] / results[True][2]:.1f}x overall; the same tokens both ways")


if __name__ == "__main__":
    main()
