"""`lmtrain generate`: continue prompts with a trained model, streaming the text to stdout as it is drawn.

Log lines go to stderr, so `lmtrain generate ... > out.txt` keeps only the text.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from lmtrain.config import GenerateConfig, register_configs, to_config
from lmtrain.errors import ConfigError, reports_user_errors

if TYPE_CHECKING:
    import torch

    from lmtrain.runs.trained import TrainedModel

register_configs("generate")
log = logging.getLogger(__name__)


def hydra_quote(value: str) -> str:
    """A Hydra override value that reads back as exactly `value`: quoted, with quotes, a backslash run before
    a quote or the end, and `${` escaped. A value the user already quoted for Hydra is left as it is."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value
    value = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    value = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
    return f"'{value}'"


def prompts(cfg: GenerateConfig) -> Iterator[str]:
    if cfg.interactive:
        while True:
            if sys.stdin.isatty():
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:  # end of input
                return
            yield line.rstrip("\n")
    elif cfg.prompt_file is not None:
        path = Path(cfg.prompt_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompt_file={cfg.prompt_file}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"prompt_file={cfg.prompt_file} is not UTF-8 text: byte {e.start:,} "
                              f"(0x{e.object[e.start]:02x}) cannot be decoded; save the prompt as UTF-8") from None
        yield text
    else:
        yield cfg.prompt


def stream_sample(trained: TrainedModel, prompt_ids: list[int], cfg: GenerateConfig,
                  generator: torch.Generator) -> None:
    """Write the prompt, then each new piece of text as soon as its token is drawn; note why it stopped."""
    from lmtrain.model.generation import TextStream, generate_tokens

    tokenizer, block = trained.tokenizer, trained.model.cfg.block_size
    sys.stdout.write(tokenizer.decode(prompt_ids, skip_special=True))
    sys.stdout.flush()
    stream, new, start = TextStream(tokenizer), [], time.perf_counter()
    for token in generate_tokens(trained.model, prompt_ids, cfg.max_new_tokens, temperature=cfg.temperature,
                                 top_k=cfg.top_k, top_p=cfg.top_p, stop_id=tokenizer.eot_id,
                                 n_tokens=tokenizer.vocab_size, generator=generator,
                                 banned=tokenizer.never_generated):
        new.append(token)
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    seconds = time.perf_counter() - start
    why = "end of text" if new and new[-1] == tokenizer.eot_id else f"max_new_tokens={cfg.max_new_tokens}"
    read = len(prompt_ids) + len(new) - 1  # the last token is drawn, never read
    slid = (f"; past the model's context of {block} tokens (model.block_size) the window slid: each later token "
            f"saw only the {block} before it") if read > block else ""
    log.info("%d tokens in %.2f s (%.1f tokens/s), stopped at %s%s", len(new), seconds,
             len(new) / max(seconds, 1e-9), why, slid)


@hydra.main(version_base="1.3", config_path="pkg://lmtrain.configs", config_name="generate")
@reports_user_errors
def app(cfg: DictConfig) -> None:
    gen = to_config(cfg, GenerateConfig)
    import torch  # imported late: --help and config errors stay fast

    from lmtrain.distributed.world import pick_device
    from lmtrain.model.generation import encode_prompt, fit_context
    from lmtrain.runs.trained import load_trained

    device = pick_device(gen.device, "device")
    trained = load_trained(gen.checkpoint, device)
    log.info("Generating with %s (%s parameters) on %s", trained.path, f"{trained.model.num_params():,}", device)
    generator = torch.Generator(device).manual_seed(gen.seed)
    for text in prompts(gen):
        try:
            ids = fit_context(encode_prompt(trained.tokenizer, text), trained.model.cfg.block_size)
        except ConfigError as e:
            if not gen.interactive:
                raise
            log.error("%s", e)  # interactive: say what is wrong and wait for the next prompt
            continue
        for i in range(gen.num_samples):
            if gen.num_samples > 1:
                sys.stdout.write(f"--- sample {i + 1}/{gen.num_samples} ---\n")
            stream_sample(trained, ids, gen, generator)


def main() -> None:
    """Free text on the command line (`prompt=def main(`) would trip Hydra's override grammar: quote it first."""
    sys.argv = [re.sub(r"^prompt=(.*)$", lambda m: "prompt=" + hydra_quote(m.group(1)), arg, flags=re.S)
                for arg in sys.argv]
    app()
