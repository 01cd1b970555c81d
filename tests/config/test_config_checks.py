"""One validation pass for the config: impossible values fail at config time, and an unknown key names the
nearest existing one instead of Hydra's `+key=...` hint."""

from __future__ import annotations

import pytest

from lmtrain.config import SCHEMAS, TrainConfig, to_train_config
from lmtrain.config.overrides import check_overrides, unknown_key
from lmtrain.errors import ConfigError

from conftest import run_cli


@pytest.mark.parametrize("key, message", [
    ("optimizer.lrr", "did you mean optimizer.lr?"),
    ("model.d_modle", "did you mean model.d_model?"),
    ("trainer.devce", "did you mean trainer.device?"),
    ("data.mixture.0.trian_files", "did you mean data.mixture.0.train_files?"),
    ("model.zzz", "its keys are bias, block_size"),
])
def test_an_unknown_key_suggests_the_nearest(key, message):
    assert message in unknown_key(TrainConfig, key)


def test_known_keys_group_choices_and_hydra_keys_pass():
    check_overrides(SCHEMAS["train"], ["model=gpt_small", "experiment=shakespeare_char", "optimizer.lr=1e-3",
                                       "data.mixture.1.weight=2", "hydra.run.dir=x", "+model.extra=1", "-m",
                                       "trainer.sample_prompts=[a,b]", "hydra/launcher=basic"])
    check_overrides(SCHEMAS["generate"], ["checkpoint=runs/x", "temperature=0.5"])
    with pytest.raises(ConfigError, match="did you mean temperature"):
        check_overrides(SCHEMAS["generate"], ["checkpoint=runs/x", "temprature=0.5"])


@pytest.mark.parametrize("values, message", [
    ({"model": {"rope_theta": -1.0}}, "model.rope_theta=-1.0 must be > 0"),
    ({"model": {"norm_eps": 0.0}}, "model.norm_eps=0.0 must be > 0"),
    ({"optimizer": {"eps": -1.0}}, "optimizer.eps=-1.0 must be > 0"),
    ({"trainer": {"device": "cuda:abc"}}, "trainer.device='cuda:abc' must be auto, cpu, cuda, cuda:N"),
    ({"trainer": {"device": "gpu"}}, "trainer.device='gpu' must be"),
    ({"data": {"max_documents": -5}}, "data.max_documents=-5 must be > 0"),
    ({"trainer": {"max_rollbacks": -1}}, "trainer.max_rollbacks=-1 must be >= 0"),
    ({"trainer": {"rollback_lr_scale": 2.0}}, r"trainer.rollback_lr_scale=2.0 must be in \(0, 1\]"),
])
def test_impossible_values_fail_at_config_time(values, message):
    with pytest.raises(ConfigError, match=message):
        to_train_config(values)


def test_cli_unknown_key_is_one_line_without_the_plus_hint(tmp_path):
    result = run_cli("train", "optimizer.lrr=1", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("lmtrain train: optimizer.lrr: unknown key 'lrr' in optimizer; "
                                     "did you mean optimizer.lr?")
    assert "+optimizer" not in result.stdout + result.stderr and not (tmp_path / "outputs").exists()


def test_a_yaml_syntax_error_in_a_config_dir_is_one_line(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("name: mine\nd_model: [1, 2\nn_layers: 2\n")
    result = run_cli("train", "--config-dir", str(tmp_path), "model=mine", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"lmtrain train: {tmp_path}/model/mine.yaml, line 3, column 9: "
                                                  "expected ',' or ']', but got ':'; fix the YAML syntax there"]


def test_a_run_folder_given_as_a_checkpoint_says_what_to_pass(tmp_path):
    (tmp_path / "checkpoints" / "best").mkdir(parents=True)
    with pytest.raises(ConfigError, match=f"is a run folder, not a checkpoint: give .*{tmp_path}/checkpoints/best"):
        to_train_config({"model": {"init_from": str(tmp_path)}})
    with pytest.raises(ConfigError, match=f"continue it with trainer.resume=auto hydra.run.dir={tmp_path}"):
        to_train_config({"trainer": {"resume": str(tmp_path)}})
