"""Shell completion answered by the dispatcher from the schema and the config folders: right answers, and no
torch (nor Hydra composing a config) behind a TAB."""

from __future__ import annotations

import os
import subprocess
import sys

from lmtrain.commands.completion import answer


def test_groups_keys_and_choices_come_from_the_schema_and_the_config_folders(tmp_path):
    assert answer("train", "lmtrain mod") == ["model.", "model="]
    assert {"model=gpt_tiny", "model=gpt_small", "model=llama_1b"} <= set(answer("train", "lmtrain model="))
    assert answer("train", "lmtrain model=gpt_s") == ["model=gpt_small"]
    assert answer("train", "lmtrain model.d_") == ["model.d_ff=", "model.d_model="]
    assert answer("train", "lmtrain trainer.precision=") == [f"trainer.precision={p}" for p in
                                                                ("auto", "fp32", "bf16", "fp16")]
    assert answer("train", "lmtrain trainer.activation_checkpointing=t") == ["trainer.activation_checkpointing=true"]
    assert answer("train", "lmtrain logger.") == ["logger.tensorboard.", "logger.wandb."]
    assert answer("eval", "lmtrain split=") == ["split=train", "split=val"]
    assert "hydra." in answer("train", "lmtrain ") and "experiment=" in answer("train", "lmtrain ")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("name: mine\n")
    assert "model=mine" in answer("train", f"lmtrain --config-dir {tmp_path} model=")


def test_hydra_keys_additions_and_deletions_are_left_to_hydra():
    assert answer("train", "lmtrain hydra/la") is None
    assert answer("train", "lmtrain +mod") is None and answer("train", "lmtrain ~model") is None


def test_a_completion_query_imports_no_torch():
    code = ("import sys\nsys.argv = ['lmtrain', 'train', '-sc', 'query=bash']\nfrom lmtrain.cli import main\n"
            "main()\nprint('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COMP_LINE": "lmtrain train trainer.dev"})
    assert done.stdout.splitlines() == ["trainer.device=", "False"], done.stderr
