#!/usr/bin/env bash
# One-shot acceptance check of lmtrain on a CUDA machine. Its stages' time limits add up to 705 s, so it
# takes at most 12 minutes on one GPU (less, as each stage usually ends well before its limit):
#   cuda_tests         120 s  the cuda-marked tests, in fp32 and bf16 (pytest -m cuda)
#   bench              150 s  scripts/bench.py on GPT-2 124M, bf16, compiled, block 1024, batch 16: tokens/s,
#                             MFU, peak memory, the loss region's time and memory, lmtrain against a bare loop
#   train_reference     60 s  200 steps of model=gpt_small on the built-in corpus, one log line per step
#   train_interrupted   45 s  the same run, stopped by SIGTERM after step 100 (it must save and exit 143)
#   train_resumed       45 s  ... resumed with trainer.resume=auto; its learning rates and positions must equal
#                             the reference's at every step, and its losses after the stop must stay within a
#                             few times the gap the two runs show just before it (flash attention's backward
#                             is not bit-exact), far below what a batch or step offset makes
#   fsdp_reference      60 s  40 steps with trainer.strategy=fsdp on this one GPU (NCCL, FSDP2), sharded
#                             checkpoints at steps 20 and 40
#   fsdp_resumed        45 s  from that run's sharded step-20 checkpoint to step 40: the same comparison
#   generate, eval, export  30 + 45 + 45 s  on the resumed run
#   fp16                60 s  60 steps in fp16 with loss scaling: not every step may be skipped, and it must learn
# then summary.json in the output folder: device, torch, each stage's outcome and seconds, the test counts,
# the bench figures, each run's figures and the comparisons. A failed stage is reported (its last lines) and
# the next one still runs; the exit status is 0 only if every stage and comparison passed.
#
#   bash scripts/gpu_check.sh                     # output in gpu_check/<date-time>/
#   GPU_CHECK_OUT=/tmp/check bash scripts/gpu_check.sh
#
# Without any NVIDIA GPU it says so in one line and exits 0. If nvidia-smi lists GPUs but torch cannot use
# them (a CPU-only torch, a driver too old for its CUDA), that is a failure: exit 1.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    echo "gpu_check: FAILED: nvidia-smi lists GPUs but torch.cuda.is_available() is False"
    nvidia-smi -L | sed 's/^/   | /'
    "$PYTHON" -c 'import torch; print("   torch", torch.__version__, "built for CUDA", torch.version.cuda)' || true
    exit 1
  fi
  echo "gpu_check: no NVIDIA GPU here (no nvidia-smi lists one, torch sees none): nothing to check"
  exit 0
fi

OUT=${GPU_CHECK_OUT:-gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAGES="$OUT/stages.jsonl"  # one {"stage", "ok", "seconds", "limit"} line per stage
: > "$STAGES"
failed=0
LMTRAIN=("$PYTHON" -m lmtrain)

# stage NAME SECONDS COMMAND...: run it under a timeout, its output in OUT/NAME.log; record the outcome.
stage() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit} s)"
  local start=$SECONDS ok=true
  if ! timeout --signal=TERM --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    ok=false
    failed=1
    echo "   FAILED; the last lines of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
  fi
  echo "{\"stage\": \"$name\", \"ok\": $ok, \"seconds\": $((SECONDS - start)), \"limit\": $limit}" >> "$STAGES"
  echo "   $([ "$ok" = true ] && echo ok || echo failed) in $((SECONDS - start)) s"
}

# gpt_small (124M, block 1024) on the built-in Python corpus, a log record per step, checkpoints every 50 steps.
TRAIN=(model=gpt_small trainer.max_steps=200 trainer.batch_size=8 trainer.log_every=1 trainer.eval_every=100
       trainer.eval_batches=5 trainer.save_every=50 trainer.sample_every=0 trainer.progress=false
       trainer.compile=false optimizer.lr=6e-4 scheduler.warmup_steps=20)
FSDP=("${TRAIN[@]}" trainer.strategy=fsdp trainer.max_steps=40 trainer.save_every=20 trainer.eval_every=40)

# argv: RUN_DIR OVERRIDES...: start `lmtrain train`, SIGTERM it once metrics.jsonl logs step 100, and expect it
# to save and exit with 143 (128 + SIGTERM).
INTERRUPT=$(cat <<'PY'
import json, signal, subprocess, sys, time
from pathlib import Path
run, overrides = Path(sys.argv[1]), sys.argv[2:]
proc = subprocess.Popen([sys.executable, "-m", "lmtrain", "train", *overrides, f"hydra.run.dir={run}"])
metrics = run / "metrics.jsonl"
while proc.poll() is None:
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    if any("loss" in r and r["step"] >= 100 for r in map(json.loads, filter(None, lines))):
        proc.send_signal(signal.SIGTERM)
        break
    time.sleep(0.05)
status = proc.wait()
print(f"stopped by SIGTERM: exit status {status}")
sys.exit(0 if status == 128 + signal.SIGTERM else 1)
PY
)

stage cuda_tests 120 "$PYTHON" -m pytest -q -m cuda tests --junitxml="$OUT/cuda_tests.xml"
stage bench 150 "$PYTHON" scripts/bench.py --case gpt_small,vocab_size=50304,batch=16 --precision bf16 --compile on \
  --rounds 1 --steps 30 --json "$OUT/bench.json"
stage train_reference 60 "${LMTRAIN[@]}" train "${TRAIN[@]}" "hydra.run.dir=$OUT/reference"
stage train_interrupted 45 "$PYTHON" -c "$INTERRUPT" "$OUT/resumed" "${TRAIN[@]}"
stage train_resumed 45 "${LMTRAIN[@]}" train "${TRAIN[@]}" trainer.resume=auto "hydra.run.dir=$OUT/resumed"
stage fsdp_reference 60 "${LMTRAIN[@]}" train "${FSDP[@]}" "hydra.run.dir=$OUT/fsdp"
stage fsdp_resumed 45 "${LMTRAIN[@]}" train "${FSDP[@]}" "trainer.resume=$OUT/fsdp/checkpoints/step_000020" \
  "hydra.run.dir=$OUT/fsdp_resumed"
stage generate 30 "${LMTRAIN[@]}" generate "checkpoint=$OUT/resumed" "prompt=def main(" max_new_tokens=64 seed=0
stage eval 45 "${LMTRAIN[@]}" eval "checkpoint=$OUT/resumed" batch_size=8 max_tokens=200000 "out=$OUT/eval.json"
stage export 45 "${LMTRAIN[@]}" export "checkpoint=$OUT/resumed" format=hf "out=$OUT/hf"
stage fp16 60 "${LMTRAIN[@]}" train model=gpt_small trainer.precision=fp16 trainer.max_steps=60 trainer.batch_size=8 \
  trainer.log_every=10 trainer.eval_every=60 trainer.eval_batches=5 trainer.save_every=0 trainer.sample_every=0 \
  trainer.progress=false trainer.compile=false optimizer.lr=6e-4 scheduler.warmup_steps=10 "hydra.run.dir=$OUT/fp16"

# The summary: every figure from the stages' files, and the comparisons.
summary_status=0
"$PYTHON" - "$OUT" <<'EOF' || summary_status=$?
import json, platform, sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

out = Path(sys.argv[1])
NOISE_FLOOR = 2e-3  # |loss difference| always allowed after a resume: far below a wrong batch's (~0.05 or more)
GAP_FACTOR = 4  # ... or this many times the largest gap of the last 10 steps before the stop


def records(run: str) -> list[dict]:
    path = out / run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def steps(run: str) -> dict[int, dict]:
    return {r["step"]: r for r in records(run) if "loss" in r}


def run_figures(run: str) -> dict:
    rs = records(run)
    train, evals = [r for r in rs if "loss" in r], [r for r in rs if "val_loss" in r]
    rates = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    mfus = [r["mfu"] for r in train if r.get("mfu")]
    return {"steps": train[-1]["step"] if train else None, "first_loss": train[0]["loss"] if train else None,
            "final_loss": train[-1]["loss"] if train else None,
            "final_val_loss": evals[-1]["val_loss"] if evals else None,
            "tokens_per_s": sorted(rates)[len(rates) // 2] if rates else None,
            "mfu": sorted(mfus)[len(mfus) // 2] if mfus else None,
            "peak_memory_gib": max((r.get("peak_memory", 0) for r in train), default=0) / 2**30,
            "skipped_steps": train[-1].get("skipped_steps") if train else None}


def stop_step(resumed: str) -> int | None:
    """The step the first half of a resumed run ended at: from the interrupted run's log, or the checkpoint a
    resume named (step_000020)."""
    log = out / "train_interrupted.log"
    if resumed == "resumed" and log.exists() and "Stopped by SIGTERM at step " in log.read_text():
        return int(log.read_text().split("Stopped by SIGTERM at step ")[1].split()[0])
    first = min(steps(resumed), default=None)
    return None if first is None else first - 1


def compare_resume(reference: str, resumed: str) -> dict:
    """A resumed run against an uninterrupted one: the same learning rate, epoch and token count at every shared
    step, and the losses of the 5 steps after the stop within max(NOISE_FLOOR, GAP_FACTOR x the largest gap of
    the 10 steps before it). The first step after a resume restores the saved weights exactly, so only the
    runs' own divergence before the stop (flash attention's backward is not bit-exact) separates them there."""
    ref, res, stop = steps(reference), steps(resumed), stop_step(resumed)
    shared = sorted(set(ref) & set(res))
    if stop is None or not shared:
        return {"ok": False, "why": "no shared steps, or no stop found"}
    positions = [s for s in shared if (ref[s]["lr"], ref[s]["epoch"], ref[s].get("tokens")) !=
                 (res[s]["lr"], res[s]["epoch"], res[s].get("tokens"))]
    gap = {s: abs(ref[s]["loss"] - res[s]["loss"]) for s in shared}
    before = [gap[s] for s in shared if stop - 10 < s <= stop]
    tolerance = max(NOISE_FLOOR, GAP_FACTOR * max(before, default=0.0))
    after = [gap[s] for s in shared if stop < s <= stop + 5]
    return {"stop_step": stop, "steps_compared": len(shared), "max_gap_10_steps_before": max(before, default=None),
            "max_gap_5_steps_after": max(after, default=None), "tolerance": tolerance,
            "steps_with_another_lr_or_position": positions,
            "ok": not positions and len(after) == 5 and max(after) <= tolerance}


def fp16_learned() -> dict:
    """fp16 with loss scaling: some steps may be skipped (the scaler starts high), never all; the loss falls."""
    figures = run_figures("fp16")
    ok = (figures["skipped_steps"] is not None and figures["steps"] == 60 and figures["skipped_steps"] < 30
          and figures["final_loss"] < figures["first_loss"])
    return {"skipped_steps": figures["skipped_steps"], "first_loss": figures["first_loss"],
            "final_loss": figures["final_loss"], "ok": ok}


summary = {"device": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "stages": [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]}
summary["limit_seconds"] = sum(s["limit"] for s in summary["stages"])
xml = out / "cuda_tests.xml"
if xml.exists():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    summary["cuda_tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
if (out / "bench.json").exists():
    rows = json.loads((out / "bench.json").read_text())["results"]
    summary["bench"] = {row["way"]: {k: row.get(k) for k in ("case", "precision", "compile", "tokens_per_s", "mfu",
                                                             "peak_source", "peak_memory", "loss_ms",
                                                             "loss_peak_memory", "lmtrain_over_bare")}
                        for row in rows}
summary["runs"] = {run: run_figures(run) for run in ("reference", "resumed", "fsdp", "fsdp_resumed", "fp16")}
shards = all((out / "fsdp/checkpoints" / f"step_{s:06d}/shards").is_dir() for s in (20, 40))
summary["checks"] = {"resume": compare_resume("reference", "resumed"),
                     "fsdp_resume": compare_resume("fsdp", "fsdp_resumed"),
                     "fp16_not_all_skipped": fp16_learned(), "fsdp_sharded_checkpoints": {"ok": shards}}
if (out / "eval.json").exists():
    summary["eval"] = json.loads((out / "eval.json").read_text())
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
failed = [s["stage"] for s in summary["stages"] if not s["ok"]]
failed += [name for name, check in summary["checks"].items() if not check["ok"]]
if failed:
    print("failed:", ", ".join(failed))
sys.exit(1 if failed else 0)
EOF
echo "gpu_check: summary in $OUT/summary.json"
if [ "$failed" -ne 0 ] || [ "$summary_status" -ne 0 ]; then
  echo "gpu_check: FAILED (see the stages above)"
  exit 1
fi
echo "gpu_check: all stages passed"
