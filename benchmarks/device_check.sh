#!/usr/bin/env bash
# One prepared run on a GPU machine (about 5 minutes): install, the triton GPU tests, the
# correctness check at real sizes, the quick benchmark against cuDNN, the cupy GPU tests
# and the plots, most important first. Everything lands in $OUT (default ./out), eight
# files at most:
#   triton_gpu.log  check.log  bench.log  cupy_gpu.log  results.csv
#   speedup_vs_batch.png  speedup_vs_hidden.png  memory.png
# Every stage runs even when an earlier one failed; the exit status says whether all passed.
# Per-stage time limits (seconds) can be changed through the environment. GPU tests run in
# one process: persistent kernels from two processes would compete for the SMs.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-./out}
TRITON_TESTS_TIMEOUT=${TRITON_TESTS_TIMEOUT:-100}
CHECK_TIMEOUT=${CHECK_TIMEOUT:-40}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-150}
CUPY_TESTS_TIMEOUT=${CUPY_TESTS_TIMEOUT:-60}
mkdir -p "$OUT"
unset TRITON_INTERPRET  # real kernels on the GPU, not the interpreter

failed=()
stage() {  # stage NAME TIMEOUT LOG COMMAND...: run, tee to LOG, remember a failure
  local name=$1 limit=$2 log=$3
  shift 3
  echo "== $name (limit ${limit}s)"
  local status=0
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log" || status=$?
  if [ "$status" -ne 0 ]; then
    echo "== $name: exit $status"
    failed+=("$name($status)")
  fi
}

# --no-deps: torch and triton are already on the machine (and nothing can be fetched).
# If the install fails, gpurnn runs from the checkout itself (it maps kernels/ then).
if ! pip_log=$("$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1); then
  printf '%s\n' "$pip_log" | tail -n 5
  echo "== pip install failed: running from the checkout with PYTHONPATH=$PWD"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi
"$PY" -m gpurnn info

stage "triton gpu tests" "$TRITON_TESTS_TIMEOUT" "$OUT/triton_gpu.log" \
  "$PY" -m pytest -q -m gpu --maxfail=20 tests/test_triton_gpu.py
stage "check" "$CHECK_TIMEOUT" "$OUT/check.log" "$PY" -m gpurnn check
# rows are appended case by case, so a run cut short still leaves what it measured
stage "bench --quick" "$BENCH_TIMEOUT" "$OUT/bench.log" \
  "$PY" -m gpurnn bench --quick --csv "$OUT/results.csv"
stage "cupy gpu tests" "$CUPY_TESTS_TIMEOUT" "$OUT/cupy_gpu.log" \
  "$PY" -m pytest -q -m gpu --maxfail=20 tests/test_cupy_backend.py
echo "== plot"
"$PY" -m gpurnn plot --csv "$OUT/results.csv" --out "$OUT" || failed+=("plot($?)")

if [ ${#failed[@]} -ne 0 ]; then
  echo "device check: FAILED stages: ${failed[*]}"
  exit 1
fi
echo "device check: all stages passed"
