"""Benchmark the data path: `lmtrain prepare` against the plain Hugging Face way, and the loader against training.

    flock /tmp/lmtrain-bench.lock python scripts/bench_data.py [--mb 200] [--workdir DIR]

1. Corpora: the built-in one (data=pystdlib) and one of about --mb MB of JSONL made from every .py file
   under this interpreter's site-packages (cycled through again if they are fewer).
2. One BPE tokenizer (lmtrain's default, trained on the built-in corpus) tokenizes everything, so both
   ways do the same work: `lmtrain prepare ... tokenizer=file`, and the plain Hugging Face way written
   after transformers' run_clm example: `Dataset.map` tokenization, then concatenate-and-chunk into
   blocks with a second `Dataset.map`. Each runs in its own process with an empty dataset cache; wall
   time and peak RSS (resource.getrusage(RUSAGE_CHILDREN)) are taken from outside it. lmtrain's
   streaming path (data=hf data.streaming=true on the same JSONL folder) runs too.
3. The loader: batches/s of gpt_tiny's shape (32 x 128) against gpt_tiny's training steps/s on this CPU.

Timings on a shared machine are noisy: compare the ratios, measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from itertools import chain
from pathlib import Path

BLOCK = 1024  # run_clm's default block size for the Hugging Face way
HF_BATCH = 1000  # Dataset.map's default batch size, as run_clm uses it


def make_corpus(folder: Path, megabytes: int) -> int:
    """JSONL shards of ~25 MB from site-packages' .py files; returns the text bytes written."""
    files = sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py"))
    folder.mkdir(parents=True, exist_ok=True)
    target, written, shard, out = megabytes * 10**6, 0, 0, None
    for path in chain.from_iterable([files] * 10):
        if written >= target:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        if out is None or out.tell() > 25 * 10**6:
            out = open(folder / f"train-{shard:05d}.jsonl", "w")
            shard += 1
        out.write(json.dumps({"text": text}) + "\n")
        written += len(text.encode("utf-8"))
    return written


def measure(command: list[str], env: dict) -> dict:
    """Run a command in a child process: wall seconds and the child's peak RSS."""
    probe = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True); "
             "print(json.dumps({'rc': r.returncode, 'seconds': time.perf_counter() - t, 'output': r.stdout[-3000:], "
             "'rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    done = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True,
                          env={**os.environ, **env}, check=True)
    result = json.loads(done.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result['output']}")
    return result


def lmtrain_prepare(overrides: list[str], cache: Path, hf_cache: Path) -> dict:
    result = measure([sys.executable, "-m", "lmtrain", "prepare", *overrides],
                     {"LMTRAIN_CACHE": str(cache), "HF_DATASETS_CACHE": str(hf_cache)})
    (manifest_path,) = cache.glob("data/*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    splits = manifest["splits"].values()
    result["tokens"] = sum(s["tokens"] for s in splits)
    result["text_bytes"] = sum(s["text_bytes"] for s in splits)
    result["tokenize_seconds"] = sum(s["seconds"] for s in splits)
    return result


def hf_map_way(corpus: str, tokenizer_file: str) -> None:
    """The plain Hugging Face way (run in a child process): Dataset.map, then concatenate and chunk."""
    import datasets
    from transformers import PreTrainedTokenizerFast

    if corpus == "pystdlib":
        from lmtrain.data.sources import stdlib_files
        ds = datasets.Dataset.from_dict({"text": [f.read_text(encoding="utf-8", errors="replace")
                                                  for f in stdlib_files()]})
    else:
        ds = datasets.load_dataset("json", data_files=sorted(str(p) for p in Path(corpus).glob("*.jsonl")),
                                   split="train")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file)

    def tokenize(batch):
        return tokenizer(batch["text"])

    def group_texts(batch):
        joined = {k: list(chain(*batch[k])) for k in batch}
        usable = len(joined["input_ids"]) // BLOCK * BLOCK
        return {k: [v[i:i + BLOCK] for i in range(0, usable, BLOCK)] for k, v in joined.items()}

    tokenized = ds.map(tokenize, batched=True, batch_size=HF_BATCH, remove_columns=ds.column_names)
    tokens = sum(len(ids) for ids in tokenized["input_ids"])
    blocks = tokenized.map(group_texts, batched=True, batch_size=HF_BATCH)
    print(json.dumps({"tokens": tokens, "blocks": len(blocks)}))


def hf_way(corpus: str, tokenizer_file: str, text_bytes: int, hf_cache: Path) -> dict:
    result = measure([sys.executable, __file__, "--hf-map", corpus, tokenizer_file],
                     {"HF_DATASETS_CACHE": str(hf_cache)})
    result["tokens"] = json.loads(result["output"].strip().splitlines()[-1])["tokens"]
    result["text_bytes"] = text_bytes
    return result


def loader_against_training(cache_root: Path) -> dict:
    """Batches per second from the loader vs. gpt_tiny's optimizer steps per second, same batch shape."""
    import torch

    from lmtrain.config import ModelConfig, OptimizerConfig
    from lmtrain.data.cache import open_cache
    from lmtrain.data.loader import MixtureLoader, TrainLoader
    from lmtrain.model import GPT
    from lmtrain.training.optim import build_optimizer

    torch.set_num_threads(os.cpu_count() or 1)
    (folder,) = [p.parent for p in cache_root.glob("data/*/manifest.json")]
    cache = open_cache(folder)
    batch, block = 32, 128
    shards = cache.shards("train")

    def rate(iterator, n: int) -> float:
        next(iterator)  # warm-up
        start = time.perf_counter()
        for _ in range(n):
            next(iterator)
        return n / (time.perf_counter() - start)

    plain = rate(iter(TrainLoader(shards, block, batch, seed=0)), 2000)
    mixed = rate(iter(MixtureLoader({"a": shards, "b": shards}, {"a": 0.7, "b": 0.3}, block, batch, seed=0)), 2000)
    model = GPT(ModelConfig(vocab_size=cache.tokenizer.vocab_size))
    optimizer = build_optimizer(model, OptimizerConfig(), "cpu")
    batches = iter(TrainLoader(shards, block, batch, seed=1))

    def step():
        x, y = next(batches)
        model(x, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    start, steps = time.perf_counter(), 20
    for _ in range(steps):
        step()
    training = steps / (time.perf_counter() - start)
    return {"loader_batches_per_s": plain, "mixture_batches_per_s": mixed, "train_steps_per_s": training}


def row(name: str, r: dict) -> str:
    mb = r["text_bytes"] / 1e6
    return (f"| {name} | {mb:,.1f} | {r['seconds']:,.1f} | {mb / r['seconds']:,.2f} | "
            f"{r['tokens'] / r['seconds']:,.0f} | {r['rss_mb']:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the large corpus in MB")
    parser.add_argument("--workdir", type=Path, default=None, help="keep corpora and caches here (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each way; the fastest counts")
    parser.add_argument("--hf-map", nargs=2, metavar=("CORPUS", "TOKENIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_map:
        return hf_map_way(*args.hf_map)

    with tempfile.TemporaryDirectory(prefix="lmtrain-bench-") as tmp:
        work = args.workdir or Path(tmp)
        corpus = work / "corpus"
        size = make_corpus(corpus, args.mb) if not corpus.is_dir() else None
        print(f"corpus: {corpus} ({'reused' if size is None else f'{size / 1e6:,.0f} MB of text'})", flush=True)

        # One tokenizer for everything: lmtrain's default BPE, trained on the built-in corpus.
        warm = lmtrain_prepare([], work / "warm-cache", work / "warm-hf")
        (tokenizer,) = (work / "warm-cache").glob("data/*/tokenizer.json")
        print(f"tokenizer: {tokenizer} (BPE trained and built-in corpus prepared in {warm['seconds']:.1f} s)",
              flush=True)
        file_tok = ["tokenizer=file", f"tokenizer.path={tokenizer}"]
        big = ["data=text_files", f"data.train_files=[{corpus}/*.jsonl]"]
        stream = ["data=hf", f"data.path={corpus}", "data.streaming=true"]
        plan = [("built-in", [], "lmtrain"), ("built-in", [], "hf"), ("large", big, "lmtrain"), ("large", big, "hf"),
                ("large", stream, "lmtrain streaming")]
        runs: dict[str, dict] = {}
        for attempt in range(args.repeat):  # interleaved, keeping each way's fastest run: load comes and goes
            for i, (name, overrides, way) in enumerate(plan):
                key = f"{name}/{way}"
                cache, hf_cache = work / f"cache-{attempt}-{i}", work / f"hf-{attempt}-{i}"
                if way.startswith("lmtrain"):
                    r = lmtrain_prepare([*overrides, *file_tok], cache, hf_cache)
                else:
                    source = "pystdlib" if name == "built-in" else str(corpus)
                    r = hf_way(source, str(tokenizer), runs[f"{name}/lmtrain"]["text_bytes"], hf_cache)
                print(f"{key}: {r['seconds']:.1f} s, {r['tokens']:,} tokens, peak RSS {r['rss_mb']:,.0f} MB",
                      flush=True)
                if key not in runs or r["seconds"] < runs[key]["seconds"]:
                    runs[key] = {**r, "rss_mb": max(r["rss_mb"], runs.get(key, r)["rss_mb"]), "cache": cache}
        loader = loader_against_training(runs["built-in/lmtrain"]["cache"])
        print(f"loader: {loader['loader_batches_per_s']:,.0f} batches/s, gpt_tiny trains "
              f"{loader['train_steps_per_s']:.2f} steps/s", flush=True)

    print("\n| corpus / way | MB of text | wall s | MB/s | tokens/s | peak RSS MB |\n|---|---|---|---|---|---|")
    for key, r in runs.items():
        print(row(key, r))
    speedup = runs["large/hf"]["seconds"] / runs["large/lmtrain"]["seconds"]
    rss_ratio = runs["large/lmtrain"]["rss_mb"] / runs["built-in/lmtrain"]["rss_mb"]
    stream_ratio = runs["large/lmtrain streaming"]["rss_mb"] / runs["built-in/lmtrain"]["rss_mb"]
    headroom = loader["loader_batches_per_s"] / loader["train_steps_per_s"]
    mixture_headroom = loader["mixture_batches_per_s"] / loader["train_steps_per_s"]
    print(f"\nlmtrain vs Hugging Face map on the large corpus: {speedup:.1f}x faster (target >= 2x)")
    print(f"peak RSS, large / built-in corpus: {rss_ratio:.2f}x; streaming: {stream_ratio:.2f}x (target <= 1.5x)")
    own = runs["large/lmtrain"]
    print(f"lmtrain's own clock, tokenizing only: {own['tokens'] / own['tokenize_seconds']:,.0f} tokens/s "
          "(large corpus)")
    print(f"loader: {loader['loader_batches_per_s']:,.0f} batches/s (mixture {loader['mixture_batches_per_s']:,.0f}); "
          f"gpt_tiny trains {loader['train_steps_per_s']:.2f} steps/s: {headroom:,.0f}x headroom "
          f"(mixture {mixture_headroom:,.0f}x; target >= 20x)")


if __name__ == "__main__":
    main()
