"""scripts/check_readme.py: every command of README.md and docs/*.md is found, planned by a documented rule,
and (one of each family, to keep CI short) runs as written with tiny budgets, offline."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_readme", ROOT / "scripts" / "check_readme.py")
check_readme = importlib.util.module_from_spec(_spec)
sys.modules["check_readme"] = check_readme  # dataclasses look their module up by name
_spec.loader.exec_module(check_readme)

PAGE = """# A page
```bash
$ lmtrain train model.d_model=100 model.n_heads=12
[12:00:00] ERROR: model.d_model=100 must be divisible by model.n_heads=12
```
Text between blocks.
<!-- check_readme: skip needs a dataset of your own -->
```
lmtrain train data=text_files data.train_files=[/data/corpus/*.txt]
```
```
lmtrain generate checkpoint=RUN_DIR prompt="a # not a comment"   # a comment
  lmtrain train this-is-output-because-it-is-indented
python -c "print(1)"
ls -la
lmtrain train trainer.max_rollbacks=2 \\
    trainer.rollback_lr_scale=0.5 ...
```
"""


def test_commands_markers_comments_and_expected_errors_are_read_from_fenced_blocks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    found = check_readme.extract_commands(page, tmp_path)
    assert [c.text for c in found] == [
        "lmtrain train model.d_model=100 model.n_heads=12",
        "lmtrain train data=text_files data.train_files=[/data/corpus/*.txt]",
        'lmtrain generate checkpoint=RUN_DIR prompt="a # not a comment"',
        'python -c "print(1)"',
        "lmtrain train trainer.max_rollbacks=2 trainer.rollback_lr_scale=0.5 ..."]
    assert found[0].expect_error == "model.d_model=100 must be divisible by model.n_heads=12"
    assert found[1].skip == "needs a dataset of your own" and found[2].skip is None
    assert [c.where for c in found] == ["page.md:3", "page.md:9", "page.md:12", "page.md:14", "page.md:16"]
    assert re.search(check_readme.error_pattern(found[0].expect_error.replace("100", "64")),
                     "[12:00:01] ERROR: model.d_model=64 must be divisible by model.n_heads=12")


@pytest.mark.parametrize("command, reason", [
    ("pip install -e .", "an install step"),
    ("python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python -m pytest", "the test suite"),
    ("lmtrain train trainer.device=cuda", "needs a GPU or a cluster"),
    ("torchrun --nproc_per_node=2 -m lmtrain train", "needs a GPU or a cluster"),
    ("lmtrain prepare data=fineweb_edu", "needs the Hugging Face hub"),
    ("lmtrain train data=hf data.path=roneneldan/TinyStories", "needs the Hugging Face hub"),
    ("lmtrain train tokenizer=pretrained tokenizer.name=gpt2", "needs the Hugging Face hub"),
    ("python scripts/bench.py", "a benchmark"),
    ("python scripts/check_readme.py --sample", "this check itself"),
    ("python -c 'import no_such_package_here'", "needs no_such_package_here"),
])
def test_the_skip_rules(command, reason):
    assert reason in check_readme.skip_reason(command)


def test_every_docs_command_has_a_plan_and_no_placeholder_is_left(tmp_path):
    commands = check_readme.all_commands()
    readme = [c for c in commands if c.where.startswith("README.md")]
    assert len(readme) >= 7 and any(c.text == "lmtrain train" for c in readme)
    checker = check_readme.Checker(tmp_path)
    checker.run_dir = tmp_path / "runs" / "01"
    (checker.run_dir / "checkpoints" / "step_000004").mkdir(parents=True)
    for c in commands:
        if c.skip or check_readme.skip_reason(c.text):
            continue
        text = checker.substitute(c.text)
        for part in re.split(r"\s+&&\s+", text):
            if check_readme.skip_reason(part) is None:
                argv = checker.argv(shlex.split(part), keep_own=c.expect_error is not None)
                leftovers = [w for w in argv if re.search(r"\b(?:DATE|TIME|RUN_DIR|FOLDER)\b|/\.\.\./", w)]
                assert not leftovers, f"{c.where}: {leftovers}"
    assert (tmp_path / "input.txt").is_file()  # the shakespeare recipes' text, written as a stand-in


@pytest.mark.slow
def test_one_command_of_each_family_runs_as_written(tmp_path):
    """README's commands and the first of each other family (command, first key) in docs/: about a minute."""
    checker = check_readme.Checker(tmp_path)
    outcomes = [checker.run(c) for c in check_readme.sample(check_readme.all_commands())]
    failed = [f"{o.command.where}: {o.command.text}\n{o.detail}" for o in outcomes if o.status == "FAILED"]
    assert not failed, "\n\n".join(failed)
    ran = [o.command.text for o in outcomes if o.status == "ok"]
    assert "lmtrain --help" in ran and any(t.startswith("lmtrain eval") for t in ran)
    assert any("model.init_from=" in t for t in ran)  # the README's fine-tuning example, as written


def test_budgets_replace_a_commands_keys_except_where_it_must_fail(tmp_path):
    checker = check_readme.Checker(tmp_path)
    plain = checker.argv(["lmtrain", "train", "model=gpt_small", "trainer.max_steps=2000"])
    assert "trainer.max_steps=4" in plain and "trainer.max_steps=2000" not in plain and "model=gpt_small" in plain
    failing = checker.argv(["lmtrain", "train", "model.d_model=100", "model.n_heads=12", "..."], keep_own=True)
    assert failing.count("model.d_model=100") == 1 and not [w for w in failing if w.startswith("model.d_model=3")]
    assert "model.n_layers=2" in failing and "..." not in failing


def test_a_doc_naming_a_file_that_does_not_exist_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "lmtrain" / "training").mkdir(parents=True)
    (tmp_path / "lmtrain" / "training" / "setup.py").write_text("")
    (tmp_path / "docs" / "other.md").write_text("# other\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text("Read `lmtrain/training/setup.py` and `training/setup.py`, [the other page](other.md#top),\n"
                    "the folder `lmtrain/training/`, `lmtrain/training/*.py`, a ratio lmtrain/bare, "
                    "[a site](https://example.com/x.md).\n"
                    "Stale: `lmtrain/config.py`, training/loop.py, [gone](gone.md), `scripts/*.sh`, docs/old/.\n")
    assert check_readme.missing_paths(page, tmp_path) == [
        "docs/page.md:3: lmtrain/config.py", "docs/page.md:3: scripts/*.sh", "docs/page.md:3: docs/old/",
        "docs/page.md:3: training/loop.py", "docs/page.md:3: gone.md"]


def test_every_file_the_docs_name_exists():
    assert [m for path in check_readme.doc_files() for m in check_readme.missing_paths(path)] == []
