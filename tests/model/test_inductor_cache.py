"""Compiled kernels are cached per ATen CPU capability: inductor's own cache keys leave it out, and kernels an
AVX512 run cached gave NaN losses when reused under ATEN_CPU_CAPABILITY=avx2 (torch 2.13)."""

from __future__ import annotations

import os

import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from lmtrain.config import ModelConfig
from lmtrain.model import GPT


def tiny() -> GPT:
    return GPT(ModelConfig(name="t", n_layers=1, n_heads=2, d_model=16, d_ff=32, block_size=8, vocab_size=11))


def test_compiling_picks_a_cache_folder_for_this_cpu_capability(monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "set")  # so that teardown restores what was there before
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    tiny().compile_blocks()
    capability = torch.backends.cpu.get_cpu_capability().lower()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.join(default_cache_dir(), f"cpu-{capability}")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what inductor sets once imported
    tiny().compile_blocks()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith(f"cpu-{capability}")


def test_a_cache_folder_the_user_chose_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    tiny().compile_blocks()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)
