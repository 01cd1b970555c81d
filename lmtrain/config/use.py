"""Using a trained model: `lmtrain generate`, `lmtrain eval`, `lmtrain export`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from omegaconf import MISSING

from lmtrain.config.base import CHECKS, check, check_device
from lmtrain.config.data import DataConfig, validate_data
from lmtrain.config.train import Precision


@dataclass
class GenerateConfig:
    checkpoint: str = MISSING  # a checkpoint folder, or a run directory: its best, else latest, else final checkpoint
    prompt: str = ""  # text to continue; "" starts a new document
    prompt_file: str | None = None  # read the prompt from this file instead
    interactive: bool = False  # read prompts from stdin, one a line, until end of input
    max_new_tokens: int = 200  # most tokens to generate per sample (the context limit may stop it sooner)
    temperature: float = 0.8  # divides the logits; 0: greedy, always the most likely token
    top_k: int = 0  # draw only from the k most likely tokens; 0: no limit
    top_p: float = 1.0  # draw only from the smallest set of tokens whose probability reaches top_p; 1: no limit
    seed: int = 0  # seeds the draws: the same seed and settings give the same text
    num_samples: int = 1  # samples per prompt
    device: str = "auto"  # auto: cuda if available, else cpu; or cpu, cuda, cuda:1, ...


class EvalSplit(str, Enum):
    train = "train"
    val = "val"


@dataclass
class EvalConfig:
    checkpoint: str = MISSING  # a checkpoint folder, or a run directory: its best, else latest, else final checkpoint
    data: DataConfig | None = None  # data=NAME to evaluate on; None: the checkpoint's own training data
    split: EvalSplit = EvalSplit.val  # which split of the data
    max_tokens: int | None = None  # score at most this many tokens, from the split's start; None: all
    batch_size: int = 8  # windows of model.block_size tokens per forward
    out: str | None = None  # the JSON file of results; None: eval_<split>.json in the checkpoint's folder
    device: str = "auto"  # auto: cuda if available, else cpu; or cpu, cuda, cuda:1, ...
    precision: Precision = Precision.fp32  # fp32 (the default, exact), bf16 or fp16 autocast, or auto (as training's)
    progress: bool | None = None  # live progress bar; None: only when stdout is a terminal


class ExportFormat(str, Enum):
    hf = "hf"  # Hugging Face transformers: GPT2LMHeadModel or LlamaForCausalLM, with its tokenizer


@dataclass
class ExportConfig:
    checkpoint: str = MISSING  # a checkpoint folder, or a run directory: its best, else latest, else final checkpoint
    format: ExportFormat = ExportFormat.hf
    out: str = MISSING  # the folder to write
    overwrite: bool = False  # replace `out` if it exists



def validate_generate(cfg: GenerateConfig) -> None:
    check(cfg.max_new_tokens > 0, f"max_new_tokens={cfg.max_new_tokens} must be > 0")
    check(cfg.temperature >= 0, f"temperature={cfg.temperature} must be >= 0 (0: greedy)")
    check(cfg.top_k >= 0, f"top_k={cfg.top_k} must be >= 0 (0: no limit)")
    check(0 < cfg.top_p <= 1, f"top_p={cfg.top_p} must be in (0, 1] (1: no limit)")
    check(cfg.num_samples > 0, f"num_samples={cfg.num_samples} must be > 0")
    sources = [k for k, given in [("prompt", cfg.prompt != ""), ("prompt_file", cfg.prompt_file is not None),
                                  ("interactive", cfg.interactive)] if given]
    check(len(sources) <= 1, f"{' and '.join(sources)} are set together: give the prompt one way")
    check_device("device", cfg.device)


def validate_eval(cfg: EvalConfig) -> None:
    check(cfg.batch_size > 0, f"batch_size={cfg.batch_size} must be > 0")
    if cfg.max_tokens is not None:
        check(cfg.max_tokens > 0, f"max_tokens={cfg.max_tokens} must be > 0 (or null for the whole split)")
    check(cfg.out is None or bool(cfg.out), "out is empty: name the JSON file to write, e.g. out=eval.json")
    check(cfg.out is None or not Path(cfg.out).expanduser().is_dir(),
          f"out={cfg.out} is a folder: name the JSON file to write, e.g. out={Path(cfg.out or '.') / 'eval.json'}")
    if cfg.data is not None:
        validate_data(cfg.data)
    check_device("device", cfg.device)


CHECKS.update({GenerateConfig: validate_generate, EvalConfig: validate_eval})
