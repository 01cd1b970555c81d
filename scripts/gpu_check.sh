#!/usr/bin/env bash
# One-shot acceptance check of lmtrain on a CUDA machine, under 8 minutes on one GPU:
#   1. the cuda-marked tests;
#   2. scripts/bench.py on GPT-2 124M (bf16, compiled per block, block 1024): tokens/s, MFU, peak memory;
#   3. a 300-step `lmtrain train model=gpt_small` on the built-in corpus, stopped by SIGTERM at step 150 and
#      resumed, its losses compared with an uninterrupted run (flash attention's backward is not bit-exact,
#      so within a tolerance, set against the gap the two runs already show before the stop);
#   4. generate, eval and export on the result;
#   5. fp16 + GradScaler forced (trainer.precision=fp16);
# and a JSON summary of every figure (summary.json in the output folder). Every stage runs under its own
# timeout; a failed stage is recorded and the next one still runs; the exit status is 1 if any failed.
#
#   bash scripts/gpu_check.sh                     # output in gpu_check/<date-time>/
#   GPU_CHECK_OUT=/tmp/check bash scripts/gpu_check.sh
#
# On a machine without CUDA it says so in one line and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing to check"
  exit 0
fi

OUT=${GPU_CHECK_OUT:-gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAGES="$OUT/stages.jsonl"  # one {"stage", "ok", "seconds"} line per stage
: > "$STAGES"
failed=0
LMTRAIN=("$PYTHON" -m lmtrain)

# stage NAME SECONDS COMMAND...: run it under a timeout, its output in OUT/NAME.log; record the outcome.
stage() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit} s)"
  local start=$SECONDS ok=true
  if ! timeout --signal=TERM --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    ok=false
    failed=1
    echo "   FAILED; the last lines of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
  fi
  echo "{\"stage\": \"$name\", \"ok\": $ok, \"seconds\": $((SECONDS - start))}" >> "$STAGES"
  echo "   $([ "$ok" = true ] && echo ok || echo failed) in $((SECONDS - start)) s"
}

# The 300-step run: gpt_small (124M, block 1024) on the built-in Python corpus, checkpoints every 50 steps.
TRAIN=(model=gpt_small trainer.max_steps=300 trainer.batch_size=8 trainer.log_every=10 trainer.eval_every=100
       trainer.eval_batches=5 trainer.save_every=50 trainer.sample_every=0 trainer.progress=false
       optimizer.lr=6e-4 scheduler.warmup_steps=30)

# argv: RUN_DIR OVERRIDES...: start `lmtrain train`, SIGTERM it once metrics.jsonl logs step 150, and expect it
# to save and exit with 143 (128 + SIGTERM).
INTERRUPT=$(cat <<'PY'
import json, signal, subprocess, sys, time
from pathlib import Path
run, overrides = Path(sys.argv[1]), sys.argv[2:]
proc = subprocess.Popen([sys.executable, "-m", "lmtrain", "train", *overrides, f"hydra.run.dir={run}"])
metrics = run / "metrics.jsonl"
while proc.poll() is None:
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    if any("loss" in r and r["step"] >= 150 for r in map(json.loads, filter(None, lines))):
        proc.send_signal(signal.SIGTERM)
        break
    time.sleep(0.2)
status = proc.wait()
print(f"stopped by SIGTERM: exit status {status}")
sys.exit(0 if status == 128 + signal.SIGTERM else 1)
PY
)

stage cuda_tests 180 "$PYTHON" -m pytest -q -m cuda tests --junitxml="$OUT/cuda_tests.xml"
stage bench 300 "$PYTHON" scripts/bench.py --case gpt_small,vocab_size=50304,batch=16 --precision bf16 --compile on \
  --rounds 1 --steps 50 --json "$OUT/bench.json"
stage train_reference 240 "${LMTRAIN[@]}" train "${TRAIN[@]}" "hydra.run.dir=$OUT/reference"
stage train_interrupted 240 "$PYTHON" -c "$INTERRUPT" "$OUT/resumed" "${TRAIN[@]}"
stage train_resumed 240 "${LMTRAIN[@]}" train "${TRAIN[@]}" trainer.resume=auto "hydra.run.dir=$OUT/resumed"
stage generate 90 "${LMTRAIN[@]}" generate "checkpoint=$OUT/resumed" "prompt=def main(" max_new_tokens=64 seed=0
stage eval 120 "${LMTRAIN[@]}" eval "checkpoint=$OUT/resumed" batch_size=8 max_tokens=200000 "out=$OUT/eval.json"
stage export 120 "${LMTRAIN[@]}" export "checkpoint=$OUT/resumed" format=hf "out=$OUT/hf"
stage fp16 200 "${LMTRAIN[@]}" train model=gpt_small trainer.precision=fp16 trainer.max_steps=60 trainer.batch_size=8 \
  trainer.log_every=10 trainer.eval_every=60 trainer.eval_batches=5 trainer.save_every=0 trainer.sample_every=0 \
  trainer.progress=false optimizer.lr=6e-4 scheduler.warmup_steps=10 "hydra.run.dir=$OUT/fp16"

# The summary: every figure from the stages' files, and the resume comparison.
summary_status=0
"$PYTHON" - "$OUT" <<'EOF' || summary_status=$?
import json, platform, sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

out = Path(sys.argv[1])
TOLERANCE = 0.05  # |loss difference| allowed after the resume, beyond the gap the runs show before the stop


def records(run: str) -> list[dict]:
    path = out / run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def losses(run: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run) if "loss" in r}


def run_figures(run: str) -> dict:
    rs = records(run)
    train, evals = [r for r in rs if "loss" in r], [r for r in rs if "val_loss" in r]
    return {"steps": train[-1]["step"] if train else None, "final_loss": train[-1]["loss"] if train else None,
            "final_val_loss": evals[-1]["val_loss"] if evals else None,
            "tokens_per_s": train[-1].get("tokens_per_s") if train else None,
            "mfu": train[-1].get("mfu") if train else None,
            "peak_memory_gib": max((r.get("peak_memory", 0) for r in train), default=0) / 2**30,
            "skipped_steps": train[-1].get("skipped_steps") if train else None}


summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "python": platform.python_version(),
           "stages": [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]}
xml = out / "cuda_tests.xml"
if xml.exists():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    summary["cuda_tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
if (out / "bench.json").exists():
    rows = json.loads((out / "bench.json").read_text())["results"]
    row = next(r for r in rows if r["way"] == "lmtrain")  # the real `lmtrain train`; its bare twin beside it
    summary["bench"] = {k: row.get(k) for k in ("case", "precision", "compile", "tokens_per_s", "mfu", "peak_source",
                                                "peak_memory", "lmtrain_over_bare")}
summary["runs"] = {run: run_figures(run) for run in ("reference", "resumed", "fp16")}
ref, res = losses("reference"), losses("resumed")
shared = sorted(set(ref) & set(res))
before = [abs(ref[s] - res[s]) for s in shared if s <= 150]
after = [abs(ref[s] - res[s]) for s in shared if s > 150]
if before and after:
    ok = max(after) <= max(before) + TOLERANCE
    summary["resume"] = {"steps_compared": len(shared), "max_gap_before_stop": max(before),
                         "max_gap_after_resume": max(after), "tolerance": TOLERANCE, "ok": ok}
    if not ok:
        (out / "stages.jsonl").open("a").write(json.dumps({"stage": "resume_matches", "ok": False}) + "\n")
        summary["stages"].append({"stage": "resume_matches", "ok": False})
if (out / "eval.json").exists():
    summary["eval"] = json.loads((out / "eval.json").read_text())
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
sys.exit(0 if all(s["ok"] for s in summary["stages"]) else 1)
EOF
echo "gpu_check: summary in $OUT/summary.json"
if [ "$failed" -ne 0 ] || [ "$summary_status" -ne 0 ]; then
  echo "gpu_check: FAILED (see the stages above)"
  exit 1
fi
echo "gpu_check: all stages passed"
