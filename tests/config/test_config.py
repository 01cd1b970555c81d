"""Config composition and the errors a user sees for a bad config, in process and through the real CLI."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import lmtrain.configs
from lmtrain.config import register_configs, to_train_config
from lmtrain.errors import ConfigError

from conftest import run_cli

register_configs()


def composed(*overrides: str):
    with initialize_config_module(config_module="lmtrain.configs", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_defaults_compose_into_the_schema():
    cfg = to_train_config(composed())
    assert cfg.model.name == "gpt_tiny" and cfg.data.source == "pystdlib" and cfg.tokenizer.kind == "bpe"
    assert cfg.optimizer.lr == 2e-3 and cfg.optimizer.betas == [0.9, 0.999] and cfg.optimizer.weight_decay == 0.01
    assert cfg.trainer.grad_clip == 1.0 and cfg.trainer.compile is None


def test_adamw_preset_holds_the_general_defaults_and_leaves_the_lr_to_the_model():
    preset = OmegaConf.load(Path(lmtrain.configs.__file__).parent / "optimizer" / "adamw.yaml")
    assert "lr" not in preset and list(preset.betas) == [0.9, 0.999] and preset.weight_decay == 0.01


@pytest.mark.parametrize("model, lr, warmup", [
    ("gpt_tiny", 2e-3, 30), ("llama_tiny", 2e-3, 30), ("gpt_small", 6e-4, 700), ("llama_small", 6e-4, 700),
    ("gpt_medium", 3e-4, 700), ("gpt_large", 2.5e-4, 700), ("llama_1b", 4e-4, 2000),
])
def test_each_model_preset_carries_its_own_lr_and_warmup(model, lr, warmup):
    cfg = to_train_config(composed(f"model={model}"))
    assert (cfg.optimizer.lr, cfg.scheduler.warmup_steps) == (lr, warmup)
    for scheduler in ("constant", "linear", "wsd"):  # another schedule keeps the model's warm-up
        assert to_train_config(composed(f"model={model}", f"scheduler={scheduler}")).scheduler.warmup_steps == warmup


def test_the_lr_falls_with_width_and_the_command_line_still_wins(tmp_path):
    gpt = [to_train_config(composed(f"model={m}")) for m in ("gpt_tiny", "gpt_small", "gpt_medium", "gpt_large")]
    assert [c.model.d_model for c in gpt] == sorted(c.model.d_model for c in gpt)
    assert [c.optimizer.lr for c in gpt] == sorted((c.optimizer.lr for c in gpt), reverse=True)
    cfg = to_train_config(composed("model=gpt_medium", "optimizer.lr=1e-3", "scheduler.warmup_steps=5"))
    assert (cfg.optimizer.lr, cfg.scheduler.warmup_steps) == (1e-3, 5)
    assert to_train_config(composed("model=gpt_medium", "optimizer=muon")).optimizer.lr == 3e-3  # muon's own
    shown = run_cli("train", "--cfg", "job", "model=gpt_medium", cwd=tmp_path)
    assert "  lr: 0.0003\n" in shown.stdout and "  warmup_steps: 700\n" in shown.stdout


def test_a_model_of_ones_own_gets_the_general_lr_and_warmup(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("name: mine\nd_model: 64\nn_heads: 2\n")
    shown = run_cli("train", "--cfg", "job", "--config-dir", str(tmp_path), "model=mine", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "  d_model: 64\n" in shown.stdout and "  lr: 0.0003\n" in shown.stdout
    assert "  warmup_steps: 100\n" in shown.stdout


def test_muon_and_wsd_presets_compose_with_every_key():
    cfg = to_train_config(composed("optimizer=muon", "scheduler=wsd", "optimizer.muon_adjust_lr=match_rms_adamw"))
    assert cfg.optimizer.name == "muon" and cfg.optimizer.muon_lr > cfg.optimizer.lr
    assert cfg.optimizer.muon_adjust_lr == "match_rms_adamw" and cfg.optimizer.muon_nesterov
    assert cfg.scheduler.name == "wsd" and 0 < cfg.scheduler.decay_fraction < 1


def test_overrides_and_group_choices_apply():
    cfg = to_train_config(composed("model=gpt_small", "optimizer.lr=1e-3", "trainer.max_steps=2000"))
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_layers, cfg.model.d_ff) == (768, 12, 12, 3072)
    assert cfg.optimizer.lr == 1e-3 and cfg.trainer.max_steps == 2000


@pytest.mark.parametrize("overrides, message", [
    (["model.d_model=100", "model.n_heads=12"], "model.d_model=100 must be divisible by model.n_heads=12"),
    (["trainer.batch_size=0"], "trainer.batch_size=0 must be > 0"),
    (["trainer.max_steps=0"], "set trainer.max_steps > 0 or trainer.epochs > 0"),
    (["model.n_kv_heads=3"], "model.n_kv_heads=3 must be > 0 and divide model.n_heads=4"),
    (["data=text_files"], "data.train_files is empty"),
    (["+optimizer.lrr=1"], "lrr"),
    (["trainer.save_every=-1"], "trainer.save_every=-1 must be >= 0"),
    (["trainer.keep_last=-2"], "trainer.keep_last=-2 must be >= 0"),
    (["trainer.resume=/no/such/run"], "trainer.resume=/no/such/run: no such checkpoint folder; to continue a run, "
                                      "use trainer.resume=auto hydra.run.dir=RUN_DIR"),
    (["model.init_from=/no/such/ckpt"], "model.init_from=/no/such/ckpt: no such checkpoint folder"),
    (["optimizer.head_lr=0.01"], "optimizer.head_lr=0.01 needs model.tie_embeddings=false"),
    (["optimizer=muon", "optimizer.muon_momentum=1.0"], "optimizer.muon_momentum=1.0 must be in \\[0, 1\\)"),
    (["scheduler=wsd", "scheduler.decay_fraction=0"], "scheduler.decay_fraction=0.0 must be in \\(0, 1\\]"),
    (["model.logit_softcap=-1"], "model.logit_softcap=-1.0 must be >= 0"),
])
def test_impossible_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        to_train_config(composed(*overrides))


def _assert_clean_failure(result, *fragments: str):
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in output, output


@pytest.mark.parametrize("overrides, fragments", [
    (["model=doesnotexist"], ["Could not find 'model/doesnotexist'", "gpt_small"]),
    (["optimizer.lrr=1"], ["unknown key 'lrr' in optimizer; did you mean optimizer.lr?"]),
    (["trainer.batch_size=abc"], ["trainer.batch_size", "abc"]),
    (["model.d_model=100", "model.n_heads=12"], ["model.d_model=100 must be divisible by model.n_heads=12"]),
    (["model.norm=batchnorm"], ["model.norm=batchnorm: must be one of layernorm, rmsnorm"]),
])
def test_cli_reports_config_mistakes_without_a_traceback(tmp_path, overrides, fragments):
    result = run_cli("train", *overrides, f"hydra.run.dir={tmp_path}/run")
    _assert_clean_failure(result, *fragments)


def test_cli_reports_a_missing_data_file(tmp_path):
    result = run_cli("train", "data=text_files", f"data.train_files=[{tmp_path}/nope/*.txt]",
                     f"hydra.run.dir={tmp_path}/run")
    _assert_clean_failure(result, "data.train_files: no file found at", "nope/*.txt")
    assert result.returncode == 2


def test_cli_reports_a_missing_text_column(tmp_path, corpus):
    result = run_cli("train", "data=text_files", f"data.train_files=[{corpus['jsonl']}]",
                     f"hydra.run.dir={tmp_path}/run")
    _assert_clean_failure(result, "data.text_column='text' is not a field of", "['content']")


def test_cli_help_lists_commands_and_groups():
    top = run_cli("--help")
    assert top.returncode == 0 and "train" in top.stdout
    train_help = run_cli("train", "--help")
    assert train_help.returncode == 0
    for group in ("model: ", "optimizer: ", "data: ", "tokenizer: ", "trainer: ", "gpt_small"):
        assert group in train_help.stdout, train_help.stdout


def test_unknown_command_fails_with_usage():
    result = run_cli("trian")
    assert result.returncode == 2 and "unknown command 'trian'" in result.stderr
