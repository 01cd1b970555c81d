"""The precision a run picks for each detected capability (faked) and for its model's own step, fp16's loss
scaling on the CPU, MFU's peaks (exact GPU names, the measured-peak cache, never above 100%), and tokens/s
without warm-up."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from lmtrain.config import ModelConfig, Precision
from lmtrain.model import GPT
from lmtrain.runs.metrics import read_metrics
from lmtrain.training import clock, mfu, precision
from lmtrain.training.precision import PrecisionChoice, TrainingPrecision, choose, confirm_on_model

from conftest import FAST_TRAIN, TINY_MODEL, run_cli

CPU = torch.device("cpu")


@pytest.mark.parametrize(("native", "speedup", "expected"), [
    (None, 0.12, "fp32"),  # AVX2 only: bf16 is emulated (8x slower on the EPYC)
    ("AVX512-BF16", 4.2, "bf16"),
    ("AMX", 9.0, "bf16"),
    ("AVX512-BF16", 1.05, "fp32"),  # native, but the probe does not confirm it faster
])
def test_auto_on_a_cpu_picks_bf16_only_where_native_and_measured_faster(monkeypatch, native, speedup, expected):
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: native)
    monkeypatch.setattr(precision, "bf16_speedup", lambda device: speedup)
    choice = choose(Precision.auto, CPU)
    assert choice.name == expected
    assert (native or "no native bf16") in choice.reason


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    for flags, expected in [({"avx2", "fma"}, None), ({"avx512f", "avx512_bf16"}, "AVX512-BF16"),
                            ({"avx512_bf16", "amx_tile", "amx_bf16"}, "AMX")]:
        monkeypatch.setattr(precision, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert precision.native_cpu_bf16() == expected


def test_explicit_bf16_without_native_bf16_warns_with_the_measured_slowdown(monkeypatch, caplog):
    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: None)
    monkeypatch.setattr(precision, "bf16_speedup", lambda device: 0.125)
    with caplog.at_level(logging.WARNING):
        assert choose(Precision.bf16, CPU).name == "bf16"  # the user's choice stands
    assert "measured 8.0x slower than fp32" in caplog.text and "trainer.precision=auto picks fp32" in caplog.text


MATMUL_BF16 = PrecisionChoice("bf16", "the CPU has AVX512-BF16; bf16 matmuls measured 3.0x fp32's speed")


def tiny_gpt(**overrides) -> GPT:
    return GPT(ModelConfig(vocab_size=68, d_model=32, n_heads=2, n_layers=1, d_ff=64, block_size=16, **overrides))


@pytest.mark.parametrize(("speedup", "expected", "words"), [(0.9, "fp32", "measured only 0.90x"),
                                                            (1.3, "bf16", "measured 1.30x")])
def test_auto_keeps_bf16_only_where_the_models_own_step_measures_faster(tmp_path, monkeypatch, speedup, expected,
                                                                        words):
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "peak_flops", lambda device, name: (1e12, "faked"))
    timed = []
    monkeypatch.setattr(precision, "step_speedup", lambda *args, **kwargs: timed.append(args[1]) or speedup)
    model = tiny_gpt()
    choice = confirm_on_model(MATMUL_BF16, model, 8, CPU)
    assert choice.name == expected and words in choice.reason and "batch 8 x 16" in choice.reason
    assert confirm_on_model(MATMUL_BF16, model, 8, CPU).name == expected
    assert timed == [8]  # measured once, then read from the cache
    confirm_on_model(MATMUL_BF16, model, 16, CPU)  # another batch is another shape: measured again
    assert timed == [8, 16] and len(json.loads((tmp_path / "bf16_step_speedup.json").read_text())) == 2


def test_no_step_is_timed_for_a_large_model_or_an_fp32_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "step_speedup", lambda *args, **kwargs: pytest.fail("a step was timed"))
    model = tiny_gpt()
    monkeypatch.setattr(precision, "peak_flops", lambda device, name: (1e3, "faked"))  # a step would take hours
    assert confirm_on_model(MATMUL_BF16, model, 8, CPU) == MATMUL_BF16
    no_native = PrecisionChoice("fp32", "this CPU has no native bf16 instructions (AMX or AVX512-BF16)")
    assert confirm_on_model(no_native, model, 8, CPU) == no_native


def test_the_step_probe_changes_no_weight_no_gradient_and_no_random_state():
    model = tiny_gpt(dropout=0.1)
    weights = {name: w.clone() for name, w in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert precision.step_speedup(model, 4, CPU, repeats=1) > 0
    assert torch.equal(torch.get_rng_state(), rng)  # dropout drew from a forked RNG
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(weights[name], w) for name, w in model.state_dict().items())


@pytest.mark.parametrize(("capability", "expected"), [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                      ((9, 0), "bf16")])
def test_auto_on_cuda_is_bf16_from_compute_capability_8(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert choose(Precision.auto, torch.device("cuda")).name == expected


def fp16_step(prec: TrainingPrecision, model: torch.nn.Linear, optimizer, poison: bool) -> None:
    with prec.autocast():
        loss = model(torch.ones(4, 8)).float().pow(2).mean()
    prec.backward(loss)
    if poison:
        model.weight.grad[0, 0] = float("inf")
    prec.step(optimizer, list(model.parameters()), clip=1.0)
    optimizer.zero_grad(set_to_none=True)


def test_fp16_scales_unscales_skips_inf_steps_and_its_state_resumes_exactly():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    prec = TrainingPrecision(PrecisionChoice("fp16", "test"), CPU)
    before = model.weight.detach().clone()
    fp16_step(prec, model, optimizer, poison=True)
    assert torch.equal(model.weight, before), "a step with an inf gradient must be skipped"
    assert prec.skipped_steps == 1 and prec.scaler.get_scale() == 2.0**15  # backed off from 2**16
    fp16_step(prec, model, optimizer, poison=False)
    assert not torch.equal(model.weight, before) and prec.skipped_steps == 1

    saved = json.loads(json.dumps(prec.state_dict()))  # through JSON, as in trainer_state.json
    resumed = TrainingPrecision(PrecisionChoice("fp16", "test"), CPU)
    resumed.load_state_dict(saved)
    assert resumed.skipped_steps == 1 and resumed.state_dict() == prec.state_dict()
    twin = torch.nn.Linear(8, 8)
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    for poison in (False, True, False):
        fp16_step(prec, model, optimizer, poison)
        fp16_step(resumed, twin, twin_opt, poison)
    assert torch.equal(model.weight, twin.weight) and resumed.state_dict() == prec.state_dict()


@pytest.mark.parametrize(("name", "bf16_tflops"), [
    ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.1), ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10G", 70.0), ("NVIDIA A10", 125.0),
    ("Tesla V100-SXM2-16GB", 15.7),  # no native bf16: emulated at its fp32 rate
    ("NVIDIA GeForce RTX 4090", 165.2), ("NVIDIA RTX A6000", 154.8),
])
def test_the_gpu_peak_table_matches_exact_device_names(name, bf16_tflops):
    assert mfu.gpu_peak_flops(name, "bf16") == pytest.approx(bf16_tflops * 1e12)


def test_unknown_gpus_get_no_data_sheet_peak():
    assert mfu.gpu_peak_flops("NVIDIA L40 Super Prototype", "bf16") is None
    assert mfu.gpu_peak_flops("Tesla V100-SXM2-16GB", "fp16") == pytest.approx(125e12)


@pytest.fixture
def fake_probe(monkeypatch, tmp_path):
    """The probe returns 1, 2, 3 ... TFLOP/s on successive calls, uncontended; the cache lives in tmp_path."""
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(mfu, "probe_peak_flops",
                        lambda device, prec: calls.append(prec) or mfu.PeakReading(len(calls) * 1e12, 1.0))
    return calls


def test_the_measured_peak_is_cached_once_reused_and_reprobed_on_request(fake_probe, tmp_path):
    assert mfu.peak_flops(CPU, "fp32") == (1e12, "measured fp32 matmul")
    assert mfu.peak_flops(CPU, "fp32")[0] == 1e12  # from the cache: no second probe
    assert fake_probe == ["fp32"]
    assert mfu.peak_flops(CPU, "bf16")[0] == 2e12  # another precision is measured on its own
    cached = json.loads((tmp_path / mfu.CACHE_FILE).read_text())
    assert cached == {mfu.machine_key(CPU, "fp32"): {"flops": 1e12, "cpu_share": 1.0},
                      mfu.machine_key(CPU, "bf16"): {"flops": 2e12, "cpu_share": 1.0}}
    assert f"| {torch.get_num_threads()} threads |" in mfu.machine_key(CPU, "fp32")
    assert mfu.peak_flops(CPU, "fp32", reprobe=True)[0] == 3e12  # scripts/bench.py --probe
    assert mfu.peak_flops(CPU, "fp32")[0] == 3e12 and len(fake_probe) == 3


def test_an_mfu_above_100_percent_reprobes_once_then_is_never_reported(fake_probe, caplog):
    meter = mfu.Mfu(CPU, "fp32", flops_per_token=1e6)  # peak 1 TFLOP/s
    assert meter(5e5) == pytest.approx(0.5)
    with caplog.at_level(logging.WARNING):
        assert meter(1.5e6) == pytest.approx(0.75)  # 150% of 1 TFLOP/s: re-measured at 2 TFLOP/s
        assert "under-measured" in caplog.text and meter.peak == 2e12
        assert meter(3e6) is None  # 150% again: the peak cannot be trusted, nothing is reported
        assert meter(1e5) is None
    assert len(fake_probe) == 2


def test_a_contended_timing_loses_to_an_uncontended_one_even_when_faster():
    # (FLOP/s, the share of its threads' wall time the process got)
    assert mfu.best_reading([(5e11, 0.95), (9e11, 0.5), (7e11, 0.99)]) == mfu.PeakReading(7e11, 0.99)
    reading = mfu.best_reading([(1e11, 0.4), (3e11, 0.6)])  # all contended: the best, flagged
    assert reading == mfu.PeakReading(3e11, 0.6) and not reading.clean


def test_a_busy_probe_never_lowers_the_cached_peak_and_is_measured_again_until_clean(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path))
    readings = iter([mfu.PeakReading(2e11, 0.5), mfu.PeakReading(1e11, 0.4), mfu.PeakReading(1.5e11, 0.45),
                     mfu.PeakReading(0.2e11, 0.1), mfu.PeakReading(3e11, 0.97),
                     mfu.PeakReading(0.1e11, 0.05), mfu.PeakReading(0.1e11, 0.05), mfu.PeakReading(0.1e11, 0.05)])
    calls = []
    monkeypatch.setattr(mfu, "probe_peak_flops", lambda device, prec: calls.append(1) or next(readings))
    with caplog.at_level(logging.WARNING):
        assert mfu.peak_flops(CPU, "fp32") == (2e11, "measured fp32 matmul, under load (50% of the CPU)")
    assert len(calls) == mfu.PROBE_ATTEMPTS and "was busy while measuring" in caplog.text
    assert mfu.peak_flops(CPU, "fp32")[0] == 2e11 and len(calls) == mfu.PROBE_ATTEMPTS  # the same run: no probe
    monkeypatch.setattr(mfu, "_PROBED_HERE", {})  # a new run
    # the next run measures again, since no clean reading is cached: one busy probe, then a clean one
    assert mfu.peak_flops(CPU, "fp32") == (3e11, "measured fp32 matmul")
    assert len(calls) == 5
    assert mfu.peak_flops(CPU, "fp32")[0] == 3e11 and len(calls) == 5  # clean and cached: no probe
    # asked to measure again (bench.py --probe) in a busy moment: the lower reading is not kept
    assert mfu.peak_flops(CPU, "fp32", reprobe=True) == (3e11, "measured fp32 matmul") and len(calls) == 8
    key = mfu.machine_key(CPU, "fp32")
    assert json.loads((tmp_path / mfu.CACHE_FILE).read_text())[key] == {"flops": 3e11, "cpu_share": 0.97}


def test_a_cached_peak_from_an_older_lmtrain_counts_as_contended(monkeypatch, tmp_path):
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path))
    (tmp_path / mfu.CACHE_FILE).write_text(json.dumps({mfu.machine_key(CPU, "fp32"): 1.6e10}))  # a bare number
    monkeypatch.setattr(mfu, "probe_peak_flops", lambda device, prec: mfu.PeakReading(3.4e11, 1.0))
    assert mfu.peak_flops(CPU, "fp32") == (3.4e11, "measured fp32 matmul")


def test_tokens_per_s_leaves_out_warm_up_and_timed_phases(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(clock.time, "perf_counter", lambda: now[0])
    run = clock.RunClock()
    # a compile, a second compile, a step that follows a slow one (still warm-up), then settled steps
    for seconds in [30.0, 2.0, 0.1, 0.1, 0.1]:
        now[0] += seconds
        run.step(100)
    with run.phase("eval"):
        now[0] += 5.0
    now[0] += 0.1
    run.step(100)
    assert run.rate() == pytest.approx(300 / 0.3)
    assert run.rate() is None  # nothing since the last call
    assert run.seconds == pytest.approx({"warm-up": 32.1, "train": 0.3, "eval": 5.0})
    assert run.overall_rate() == pytest.approx(1000.0)
    assert run.split() == "37.4 s: warm-up 32.1, train 0.3, eval 5.0, other 0.0"


@pytest.mark.slow
def test_fp16_training_resumes_with_its_scaler_state_exactly(tmp_path):
    """fp16 + GradScaler through the real CLI on the CPU: a run resumed from the step-4 checkpoint logs the same
    losses, gradient norms and skipped steps as the uninterrupted run, and ends at the same weights."""
    run_args = [*TINY_MODEL, *FAST_TRAIN, "trainer.precision=fp16", "trainer.max_steps=8", "trainer.save_every=4",
                "trainer.eval_every=4", "trainer.keep_last=0"]
    env = {"OMP_NUM_THREADS": "1"}
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    result = run_cli("train", *run_args, f"hydra.run.dir={reference}", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Precision fp16: trainer.precision=fp16" in result.stdout
    result = run_cli("train", *run_args, f"trainer.resume={reference}/checkpoints/step_000004",
                     f"hydra.run.dir={resumed}", env=env)
    assert result.returncode == 0, result.stdout + result.stderr

    def steps(run, first):
        return [{k: r[k] for k in ("step", "loss", "grad_norm", "skipped_steps")}
                for r in read_metrics(run / "metrics.jsonl") if "loss" in r and r["step"] >= first]
    assert steps(resumed, 5) == steps(reference, 5) and len(steps(reference, 5)) == 4
    # the scaler's growth tracker counts steps since its last overflow: 8 at step 8 only if step 4's was restored
    final = [json.loads((r / "checkpoints/step_000008/trainer_state.json").read_text())["precision"]
             for r in (reference, resumed)]
    assert final[0] == final[1]
    assert final[0]["skipped_steps"] > 0 or final[0]["grad_scaler"]["_growth_tracker"] == 8
    a, b = (load_file(str(r / "checkpoints/final/model.safetensors")) for r in (reference, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_no_logged_mfu_is_above_100_percent_even_from_an_under_measured_peak(tmp_path, private_cache):
    """A cached peak far too low (a probe on a busy machine, say) is re-measured, and no MFU above 100% is logged."""
    cache = tmp_path / "cache"
    cache.mkdir()
    key = mfu.machine_key(CPU, "fp32")
    (cache / mfu.CACHE_FILE).write_text(json.dumps({key: {"flops": 1e6, "cpu_share": 1.0}}))  # 1 MFLOP/s
    run = tmp_path / "run"
    result = run_cli("train", *TINY_MODEL, *FAST_TRAIN, "trainer.precision=fp32", "trainer.max_steps=6",
                     f"data.cache_dir={private_cache}", f"hydra.run.dir={run}", env={"LMTRAIN_CACHE": str(cache)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the peak was under-measured; measuring it again" in result.stdout
    assert json.loads((cache / mfu.CACHE_FILE).read_text())[key]["flops"] > 1e9  # re-measured and cached
    logged = [r["mfu"] for r in read_metrics(run / "metrics.jsonl") if "mfu" in r]
    assert logged and all(m is None or 0 < m <= 1 for m in logged)


def test_the_peak_probe_leaves_the_global_rng_alone():
    """A run that measures the peak must draw the same dropout and data as one that found it in the cache."""
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    mfu.probe_peak_flops(CPU, "fp32", repeats=1, min_seconds=0.0)
    assert torch.equal(torch.rand(4), expected)


def _rank_choice(rank: int, init_file: str, cache_root: str, speedups: list[float], results: str) -> None:
    """One gloo rank: its own cache and its own (faked) step timing; writes the choice it ends with."""
    import os

    import torch.distributed as dist
    os.environ["LMTRAIN_CACHE"] = os.path.join(cache_root, str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(speedups))
    precision.peak_flops = lambda device, name: (1e12, "faked")
    precision.step_speedup = lambda *args, **kwargs: speedups[rank]
    model = tiny_gpt()
    choice = confirm_on_model(MATMUL_BF16, model, 8, CPU)
    with open(os.path.join(results, str(rank)), "w") as f:
        f.write(f"{choice.name}|{choice.reason}")
    dist.destroy_process_group()


@pytest.mark.parametrize(("speedups", "expected"), [([1.3, 1.4], "bf16"), ([1.3, 0.9], "fp32")])
def test_every_rank_keeps_bf16_or_none_does(tmp_path, speedups, expected):
    results = tmp_path / "results"
    results.mkdir()
    torch.multiprocessing.spawn(_rank_choice, args=(str(tmp_path / "init"), str(tmp_path / "cache"), speedups,
                                                    str(results)), nprocs=2)
    choices = [(results / str(rank)).read_text().split("|") for rank in range(2)]
    assert [name for name, _ in choices] == [expected, expected]
    if expected == "fp32":  # the rank that measured bf16 faster says why it still runs fp32
        assert "another rank measured" in choices[0][1] and "measured only 0.90x" in choices[1][1]
