"""What a run tells its user: the ETA in log lines, the summary's figures after a resume with nothing left to
train, a summary never cut at 80 columns, files readable as the umask says, each library warning once."""

from __future__ import annotations

import io
import json
import logging
import os
import stat

import pytest
from rich.console import Console

from lmtrain import console as console_module
from lmtrain.runs.metrics import read_metrics, recorded_figures, summary_table
from lmtrain.training.clock import RunClock
from lmtrain.training.eta import Eta, duration

from conftest import FAST_TRAIN, TINY_MODEL, run_cli


def test_durations_read_at_every_scale():
    assert [duration(s) for s in (4.4, 65, 3 * 3600 + 7 * 60 + 5, 2 * 86400 + 5 * 3600)] == [
        "4 s", "1 min 05 s", "3 h 07 min", "2 d 5 h"]


def test_before_a_step_settles_the_eta_is_the_pace_so_far_times_the_steps_left(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("lmtrain.training.clock.time.perf_counter", lambda: now[0])
    eta = Eta(RunClock(), first_step=10, total_steps=100)
    now[0] = 160.0
    assert eta.text(11) == "1 h 29 min"  # 60 s for one step, 89 left
    assert eta.first_step_note(11) == ("The first step took 1 min 00 s; at that pace the 89 steps left take about "
                                       "1 h 29 min")
    assert eta.first_step_note(12) is None  # only after the first step
    now[0] = 100.5
    assert eta.first_step_note(11) is None  # a fast first step needs no note


def test_the_eta_follows_a_change_of_speed_and_counts_evaluations(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("lmtrain.training.clock.time.perf_counter", lambda: now[0])
    clock = RunClock()
    eta = Eta(clock, first_step=0, total_steps=1000)
    for step in range(1, 301):
        now[0] += 1.0 if step <= 100 else 0.1  # the machine got 10x faster at step 100
        clock.step(1)
        if step % 50 == 0:
            with clock.phase("eval"):
                now[0] += 15.0  # 15 s every 50 steps: 0.3 s per step
    # the recent pace (0.1 s) plus evaluations (0.3 s a step), 700 steps left; a whole-run average says 490 s
    assert eta.remaining(300) == pytest.approx(700 * (0.1 + 0.3), rel=0.02)


def test_an_80_column_terminal_shows_the_whole_eta(monkeypatch):
    for width in (80, 120):
        out = io.StringIO()
        bar = console_module.progress_bar(True, Console(file=out, width=width, force_terminal=True, color_system=None))
        bar.add_task("train", total=190730, completed=123450, loss="10.1234", lr="6.00e-04", speed="1,234,567",
                     mfu="45.3%", eta="12 h 07 min")
        bar.console.print(bar.get_renderable())
        (line,) = out.getvalue().splitlines()
        assert line.endswith("ETA 12 h 07 min") and len(line) <= width and "123450/190730" in line
        assert ("MFU 45.3%" in line) == (width >= console_module.WIDE_TERMINAL)


def test_recorded_figures_are_the_last_loss_and_the_runs_training_rate(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 10, "loss": 5.0, "tokens": 1000, "tokens_per_s": 100.0}, {"step": 10, "val_loss": 4.9},
               {"step": 20, "loss": 4.5, "tokens": 2000, "tokens_per_s": 50.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert recorded_figures(path) == (4.5, 2000 / (10 + 20))
    assert str(recorded_figures(tmp_path / "none.jsonl")) == "(nan, 0.0)"


def test_outside_a_terminal_the_summary_keeps_long_paths_whole(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(console_module, "console", Console(file=out, width=80, highlight=False))
    path = "/scratch/" + "a-long-folder-name/" * 8 + "checkpoints/final"
    console_module.print_table(summary_table([("steps", "4"), ("checkpoint", path)]))
    assert path in out.getvalue() and "…" not in out.getvalue()


def test_hub_warnings_print_once(capsys, caplog):
    console_module.quiet_libraries()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
    assert [r.message for r in caplog.records] == ["Retrying in 1s [Retry 1/5]."]
    assert "Retrying" not in capsys.readouterr().err  # huggingface_hub's own stderr handler is gone


@pytest.mark.slow
def test_a_short_run_reports_its_eta_and_full_paths_and_a_no_op_resume_its_real_figures(tmp_path):
    run = tmp_path / ("a-run-directory-with-a-long-name-" * 3) / "run"
    args = [*TINY_MODEL, *FAST_TRAIN, "trainer.max_steps=6", "trainer.log_every=3", f"hydra.run.dir={run}"]
    previous = os.umask(0o027)
    try:
        first = run_cli("train", *args)
    finally:
        os.umask(previous)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "WARNING: scheduler.warmup_steps=30 >= the run's 6 steps" in first.stdout
    assert [line.split("ETA: ")[1] for line in first.stdout.splitlines() if "Batch 3, Loss" in line] != ["-"]
    assert str(run / "checkpoints" / "final") in first.stdout  # on one line, not cut at 80 columns
    modes = {stat.S_IMODE(f.stat().st_mode) for f in (run / "checkpoints" / "step_000006").iterdir()}
    assert modes == {0o640}  # optimizer.safetensors too, which safetensors alone writes 0600

    again = run_cli("train", *args, "trainer.resume=auto")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing left to train" in again.stdout and "WARNING: scheduler" not in again.stdout
    last_loss = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r][-1]
    assert f"final train loss      │ {last_loss:.4f}" in again.stdout
    assert "│ 0 tokens/s" not in again.stdout and "nan" not in again.stdout
