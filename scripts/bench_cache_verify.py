"""What verifying a token cache by content costs, on the built-in corpus (data=pystdlib, the default tokenizer).

    python scripts/bench_cache_verify.py [--cache-dir DIR] [--repeats 5]

Times, each the best of --repeats:
- an open whose shards are unchanged since their last verification (every `lmtrain train` start): the
  manifest's checksum, the shards' sizes and modification times;
- an open that reads every shard (the first open after a shard changed, or `lmtrain prepare verify=true`):
  SHA-256 and the largest token id of each shard;
- for scale, one training step of the default model (gpt_tiny) at the default batch on this CPU.
Batches pay nothing: the loader reads shards as they are, the checks happen at open.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=None, help="an lmtrain cache (default: a new temporary one)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    root = args.cache_dir or Path(tempfile.mkdtemp(prefix="lmtrain-verify-"))
    env = {**os.environ, "LMTRAIN_CACHE": str(root)}
    subprocess.run([sys.executable, "-m", "lmtrain", "prepare"], env=env, check=True, capture_output=True)
    os.environ["LMTRAIN_CACHE"] = str(root)

    import torch
    from hydra import compose, initialize_config_module

    from lmtrain.config import register_configs, to_train_config
    from lmtrain.data.cache import open_cache
    from lmtrain.training.setup import build_parts

    folders = [p.parent for p in root.glob("data/*/manifest.json")]
    folder = max(folders, key=lambda p: p.stat().st_mtime)
    cache = open_cache(folder)
    shard_bytes = sum((folder / name).stat().st_size for name in cache.manifest["checksums"])
    unchanged = best(lambda: open_cache(folder), args.repeats)
    every_shard = best(lambda: open_cache(folder, verify_all=True), args.repeats)

    register_configs()
    with initialize_config_module(config_module="lmtrain.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer.progress=false", "trainer.precision=fp32"])
    with tempfile.TemporaryDirectory() as run_dir:
        parts = build_parts(to_train_config(cfg), Path(run_dir))
        batches = iter(parts.train_loader)

        def step():
            x, y = next(batches)
            parts.model(x, y).backward()
            parts.optimizer.step()
            parts.optimizer.zero_grad(set_to_none=True)

        step()
        train_step = best(step, args.repeats)
    print(f"cache {folder}: {cache.num_tokens('train') + cache.num_tokens('val'):,} tokens in "
          f"{len(cache.manifest['checksums'])} shards, {shard_bytes / 1e6:.1f} MB; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"open, shards unchanged (every start):          {1000 * unchanged:8.2f} ms")
    print(f"open, every shard read (changed, verify=true):  {1000 * every_shard:8.2f} ms "
          f"({shard_bytes / every_shard / 1e9:.2f} GB/s)")
    print(f"one gpt_tiny training step (for scale):        {1000 * train_step:8.2f} ms")


if __name__ == "__main__":
    main()
