"""Files read back from run folders, damaged every way a crash, a disk or a hand can damage them: each reader
keeps what is good, names the file and line of what is not, and summaries of damaged sweeps still print."""

import json
import logging

import pytest

from lmtrain.commands.plot import plot_command
from lmtrain.commands.summarize import summarize_command
from lmtrain.errors import CheckpointError
from lmtrain.runs import records
from lmtrain.runs.records import (
    read_metrics,
    read_overrides,
    read_settings,
    read_status,
    read_trainer_state,
    step_candidates,
)


@pytest.fixture(autouse=True)
def every_warning(monkeypatch):
    monkeypatch.setattr(records, "_warned", set())  # each test sees its own warnings


def good(step: int, loss: float = 2.0) -> str:
    return json.dumps({"step": step, "loss": loss, "lr": 1e-3, "tokens": step * 64, "tokens_per_s": 100.0,
                       "elapsed_s": step * 0.5}) + "\n"


def write_run(folder, metrics: bytes, status: bytes | None = None, overrides: bytes | None = None):
    (folder / ".hydra").mkdir(parents=True)
    (folder / "metrics.jsonl").write_bytes(metrics)
    if status is not None:
        (folder / "status.json").write_bytes(status)
    if overrides is not None:
        (folder / ".hydra/overrides.yaml").write_bytes(overrides)
    return folder


@pytest.mark.parametrize("line, problem", [
    (b"[1, 2]", "line 2: not a JSON object but list"),
    (b"7", "line 2: not a JSON object but int"),
    (b'{"loss": 1.0}', "line 2: no step"),
    (b'{"step": 2, "loss": "2.5"}', "line 2: loss='2.5' is not a number"),
    (b'{"step": -1, "loss": 2.5}', "line 2: step=-1 is not a whole number >= 0"),
    (b'{"step": 2.5, "loss": 2.5}', "line 2: step=2.5 is not a whole number >= 0"),
    (b'{"step": 2, "elapsed_s": "soon"}', "line 2: elapsed_s='soon' is not a number of seconds"),
    (b'{"step": 2, "samples": "text"}', "line 2: samples is not a list of texts"),
    (b'{"step": 2, "loss": 1.0', "line 2: not valid JSON"),
    (b'{"step": 2, "loss": \xff\xfe}', "line 2: not UTF-8 text"),
])
def test_a_bad_metrics_record_is_skipped_with_a_warning_naming_file_and_line(tmp_path, caplog, line, problem):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(good(1).encode() + line + b"\n" + good(3).encode())
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(path)] == [1, 3]
    assert f"Skipped 1 bad record in {path}; the first: {problem}" in caplog.text


def test_a_torn_last_line_is_a_crash_not_a_warning_and_nan_losses_are_records(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(good(1) + '{"step": 2, "val_loss": NaN, "grad_norm": Infinity}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert caplog.text == ""
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_status_json_damaged_or_mistyped(tmp_path, caplog):
    (tmp_path / "status.json").write_bytes(b"\xff\xfe{")
    with caplog.at_level(logging.WARNING):
        assert read_status(tmp_path) is None
    assert f"Ignoring {tmp_path / 'status.json'}: it is not readable JSON" in caplog.text
    (tmp_path / "status.json").write_text('["completed"]')
    assert read_status(tmp_path) is None
    (tmp_path / "status.json").write_text('{"status": "completed", "job": "zero", "value": 1.5, "steps": true}')
    assert read_status(tmp_path) == {"status": "completed", "value": 1.5}
    assert "ignoring job, steps, of the wrong type" in caplog.text
    assert read_status(tmp_path / "nowhere") is None


def test_overrides_and_settings_damaged(tmp_path, caplog):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra/overrides.yaml").write_text("- optimizer.lr=1e-3\n- [: oops\n")
    with caplog.at_level(logging.WARNING):
        assert read_overrides(tmp_path) == []
    assert f"Ignoring {tmp_path / '.hydra/overrides.yaml'} (the run's overrides)" in caplog.text
    (tmp_path / ".hydra/overrides.yaml").write_text("- optimizer.lr=1e-3\n- 12\n- {a: b}\n")
    assert read_overrides(tmp_path) == ["optimizer.lr=1e-3"]
    (tmp_path / ".hydra/config.yaml").write_text("optimizer:\n  lr: 0.002\n  betas: [0.9, 0.95]\nseed: null\n")
    (tmp_path / ".hydra/hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      model: gpt_small\n"
                                               "      hydra/launcher: basic\n")
    assert read_settings(tmp_path) == {"optimizer.lr": "0.002", "optimizer.betas": "[0.9, 0.95]", "seed": "null",
                                       "model": "gpt_small"}
    (tmp_path / ".hydra/config.yaml").write_bytes(b"\xff")
    assert read_settings(tmp_path) == {"model": "gpt_small"}


def test_checkpoint_files_are_strict_and_latest_json_only_a_hint(tmp_path, caplog):
    step = tmp_path / "step_000004"
    step.mkdir()
    with pytest.raises(CheckpointError, match="step_000004 is not a checkpoint: it has no trainer_state.json"):
        read_trainer_state(step)
    (step / "trainer_state.json").write_text('{"step": 4, "loader": {}, "metrics_bytes": "12"}')
    with pytest.raises(CheckpointError, match="metrics_bytes='12' is not a whole number"):
        read_trainer_state(step)
    (step / "trainer_state.json").write_text('{"step": 4, "loader": {}, "val_loss": null, "metrics_bytes": 12}')
    assert read_trainer_state(step)["step"] == 4
    (tmp_path / "step_000002").mkdir()
    (tmp_path / "latest.json").write_text('{"step": "four"}')
    with caplog.at_level(logging.WARNING):
        assert step_candidates(tmp_path) == [step, tmp_path / "step_000002"]
    assert "Ignoring" in caplog.text and "not a whole number" in caplog.text


def test_summarize_and_plot_a_sweep_damaged_every_way(tmp_path, capsys, caplog):
    sweep = tmp_path / "sweep"
    evals = "".join(json.dumps({"step": s, "val_loss": 3.0 - s / 4, "elapsed_s": s}) + "\n" for s in (2, 4))
    write_run(sweep / "0_optimizer.lr=1e-3", (good(1) + good(2) + good(3) + good(4) + evals).encode(),
              b'{"job": 0, "status": "completed"}', b"- optimizer.lr=1e-3\n")
    damaged = b'[1]\n\xff\xfe\n{"loss": 3}\n{"step": 2, "loss": "x"}\n'
    write_run(sweep / "1_optimizer.lr=2e-3", good(1).encode() + damaged + evals.encode() + b'{"step": 5, "lo',
              b"\x00garbage", b"- optimizer.lr=2e-3\n- [: oops\n")
    write_run(sweep / "2_optimizer.lr=3e-3", b"", b'{"job": 2, "status": "failed", "error": "boom"}',
              b"{not: a list}\n")
    (sweep / "multirun.yaml").write_text("{}\n")
    with caplog.at_level(logging.WARNING):
        summarize_command([str(sweep)])
        plot_command([str(sweep)])
    out = capsys.readouterr().out
    assert "3 jobs: 1 completed" in out and "1 failed" in out and "1 -" in out  # unreadable status.json: "-"
    warnings = caplog.text
    assert f"Skipped 4 bad records in {sweep / '1_optimizer.lr=2e-3/metrics.jsonl'}; the first: line 2: not a JSON" \
        in warnings
    assert f"Ignoring {sweep / '1_optimizer.lr=2e-3/status.json'}" in warnings
    assert f"Ignoring {sweep / '1_optimizer.lr=2e-3/.hydra/overrides.yaml'} (the run's overrides): line 2, column 4" \
        in warnings
    assert f"Ignoring {sweep / '2_optimizer.lr=3e-3/.hydra/overrides.yaml'} (the run's overrides): not a list" \
        in warnings
    assert (sweep / "summary.csv").is_file() and (sweep / "summary.png").read_bytes()[:4] == b"\x89PNG"
