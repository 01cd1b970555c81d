"""The configs of generate, eval and export: composition, the checks that name a key, and free-text prompts."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module

from lmtrain.commands.generate import hydra_quote
from lmtrain.config import (
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    SourceKind,
    TrainConfig,
    register_configs,
    to_config,
)
from lmtrain.errors import ConfigError

register_configs()


def composed(name: str, *overrides: str):
    with initialize_config_module(config_module="lmtrain.configs", version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def test_each_command_composes_into_its_schema():
    gen = to_config(composed("generate", "checkpoint=run"), GenerateConfig)
    assert (gen.temperature, gen.top_k, gen.top_p, gen.max_new_tokens) == (0.8, 0, 1.0, 200)
    ev = to_config(composed("eval", "checkpoint=run"), EvalConfig)
    assert ev.data is None and ev.split == "val" and ev.out is None  # None: beside the checkpoint
    ev = to_config(composed("eval", "checkpoint=run", "data=text_files", "data.train_files=[a.txt]"), EvalConfig)
    assert ev.data.source == SourceKind.text_files and ev.data.train_files == ["a.txt"]
    ex = to_config(composed("export", "checkpoint=run", "out=hf"), ExportConfig)
    assert ex.format == "hf" and not ex.overwrite
    train = to_config(composed("train"), TrainConfig)
    assert train.trainer.sample_every == 200 and train.trainer.sample_prompts == ["", "def "]


@pytest.mark.parametrize("name, overrides, message", [
    ("generate", ["top_p=1.5"], r"top_p=1.5 must be in \(0, 1\]"),
    ("generate", ["top_p=0"], r"top_p=0.0 must be in \(0, 1\]"),
    ("generate", ["temperature=-1"], "temperature=-1.0 must be >= 0"),
    ("generate", ["top_k=-2"], "top_k=-2 must be >= 0"),
    ("generate", ["max_new_tokens=0"], "max_new_tokens=0 must be > 0"),
    ("generate", ["prompt=x", "interactive=true"], "prompt and interactive are set together"),
    ("generate", ["device=tpu"], "device='tpu' must be auto, cpu, cuda, cuda:N"),
    ("eval", ["batch_size=0"], "batch_size=0 must be > 0"),
    ("eval", ["data=text_files"], "data.train_files is empty"),
    ("export", [], "out is not set: give out=..."),
])
def test_mistakes_name_the_key(name, overrides, message):
    with pytest.raises(ConfigError, match=message):
        to_config(composed(name, "checkpoint=run", *overrides), {"generate": GenerateConfig, "eval": EvalConfig,
                                                                 "export": ExportConfig}[name])


def test_missing_checkpoint_is_named():
    with pytest.raises(ConfigError, match="checkpoint is not set: give checkpoint=..."):
        to_config(composed("generate"), GenerateConfig)


def test_sample_prompts_must_exist_when_sampling():
    with pytest.raises(ConfigError, match="trainer.sample_prompts is empty"):
        to_config(composed("train", "trainer.sample_prompts=[]"), TrainConfig)


@pytest.mark.parametrize("text", ["def main(", "x = f'{a}' + \"b\"", "héllo, 世界", "a,b", "[1, 2]", "it's",
                                  "back\\slash\\", "${oc.env:HOME}", "\\${x}", "tab\there", ""])
def test_any_prompt_text_survives_hydras_override_grammar(text):
    cfg = to_config(composed("generate", "checkpoint=run", "prompt=" + hydra_quote(text)), GenerateConfig)
    assert cfg.prompt == text
