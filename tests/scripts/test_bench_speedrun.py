"""scripts/bench_speedrun.py's reading of metrics.jsonl: training time to the target excludes evaluations."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_speedrun.py"
spec = importlib.util.spec_from_file_location("bench_speedrun", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def records(*evals: tuple[int, float, float, float]) -> list[dict]:
    """(step, step record's elapsed_s, evaluation record's elapsed_s, val_loss) -> metrics.jsonl records."""
    out = []
    for step, stepped, evaluated, val_loss in evals:
        out += [{"step": step, "loss": 2.0, "elapsed_s": stepped},
                {"step": step, "val_loss": val_loss, "elapsed_s": evaluated}]
    return out


def test_training_time_leaves_out_every_evaluation_up_to_the_first_at_the_target():
    run = records((25, 10.0, 12.0, 2.3), (50, 22.0, 25.0, 1.88), (75, 35.0, 37.0, 1.80))
    r = bench.time_to_target(run, 1.886)
    assert r == {"step": 50, "val_loss": 1.88, "wall_s": 25.0, "train_s": pytest.approx(20.0), "reached": True,
                 "whole_passes": 2, "screening_passes": 0}


def test_screening_passes_count_as_evaluation_time_and_never_as_the_target():
    run = [{"step": 25, "loss": 2.0, "elapsed_s": 10.0}, {"step": 25, "val_screen_loss": 1.80, "elapsed_s": 10.5},
           {"step": 50, "loss": 2.0, "elapsed_s": 20.5}, {"step": 50, "val_screen_loss": 1.90, "elapsed_s": 21.0},
           {"step": 50, "val_loss": 1.87, "elapsed_s": 24.0}]
    r = bench.time_to_target(run, 1.886)  # the screen read 1.80 at step 25, but only a whole pass decides
    assert r == {"step": 50, "val_loss": 1.87, "wall_s": 24.0, "train_s": pytest.approx(20.0), "reached": True,
                 "whole_passes": 1, "screening_passes": 2}


def test_a_run_that_never_reaches_the_target_gives_its_whole_training_time():
    r = bench.time_to_target(records((25, 10.0, 12.0, 2.3), (50, 22.0, 25.0, 1.95)), 1.886)
    assert not r["reached"] and r["step"] == 50 and r["train_s"] == pytest.approx(20.0)


def test_an_evaluation_without_a_step_record_before_it_is_refused():
    with pytest.raises(SystemExit, match="log_every must divide eval_every"):
        bench.time_to_target([{"step": 3, "loss": 2.0, "elapsed_s": 1.0}, {"step": 5, "val_loss": 2.0,
                                                                           "elapsed_s": 2.0}], 1.886)


def test_the_cpu_description_names_the_instruction_sets(monkeypatch):
    cpu = bench.cpu_description()
    assert set(cpu["isa"]) == {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"} and cpu["model"]
    monkeypatch.setattr(bench, "cpu_flags", lambda: frozenset({"fma", "avx2", "avx512_bf16"}))
    assert bench.cpu_description()["isa"] == {"avx2": True, "avx512f": False, "avx512_bf16": True,
                                              "amx_bf16": False, "amx_tile": False}
