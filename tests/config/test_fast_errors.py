"""A mistyped value is one line naming the key, exit 2, found before torch is imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmtrain.config import TrainConfig
from lmtrain.config.overrides import check_overrides
from lmtrain.errors import ConfigError


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=abc", "optimizer.lr=abc: 'abc' is not a number"),
    ("trainer.max_steps=1.5", "trainer.max_steps=1.5: '1.5' is not a whole number"),
    ("trainer.precision=bf32", "trainer.precision=bf32: must be one of auto, fp32, bf16, fp16"),
    ("trainer.activation_checkpointing=maybe", "trainer.activation_checkpointing=maybe: 'maybe' is not true or false"),
    ("optimizer.lr=null", "optimizer.lr=null: a value is required here, not null"),
])
def test_a_value_of_the_wrong_type_names_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        check_overrides(TrainConfig, [override])
    assert str(e.value) == message


def test_values_of_the_right_type_and_hydra_syntax_pass():
    check_overrides(TrainConfig, ["optimizer.lr=1e-3", "trainer.max_steps=20", "trainer.compile=null",
                                 "trainer.precision=bf16", "optimizer.lr=1e-3,3e-4", "trainer.max_steps=range(1,3)",
                                 "optimizer.lr=${oc.env:LR}", "trainer.sample_prompts=[a,b]", "model.name='x y'",
                                 "trainer.compile=true", "model.vocab_size=null"])


def test_a_config_error_exits_2_in_one_line_without_importing_torch(tmp_path):
    code = ("import sys\nsys.argv = ['lmtrain', 'train', 'optimizer.lr=abc']\nfrom lmtrain.cli import main\n"
            "try:\n    main()\nfinally:\n    print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=os.environ)
    assert done.returncode == 2 and done.stdout.strip() == "False"
    assert done.stderr.strip() == "lmtrain train: optimizer.lr=abc: 'abc' is not a number"


def test_a_cross_field_error_after_composing_imports_no_torch_either(tmp_path):
    code = ("import sys\nsys.argv = ['lmtrain', 'train', 'model.d_model=100', 'model.n_heads=12']\n"
            "from lmtrain.cli import main\ntry:\n    main()\nfinally:\n    print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=os.environ)
    assert done.returncode == 2 and done.stdout.strip().splitlines()[-1] == "False", done.stdout + done.stderr
    assert "model.d_model=100 must be divisible by model.n_heads=12" in done.stdout
