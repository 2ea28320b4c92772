#!/usr/bin/env bash
# One prepared run on a GPU machine, at most TOTAL_LIMIT seconds (default 290: under five
# minutes on a cold H100), most important first, each stage under its own time limit:
#   1. the triton GPU tests, fast default set (-m "gpu and not slow"): the
#      headline shapes, LSTM projections, then each kind of plan               TRITON_TESTS_LIMIT
#   2. python -m gpurnn check (every backend vs the float64 reference)      CHECK_LIMIT
#   3. python -m gpurnn bench --quick, cuDNN rows included                  BENCH_LIMIT
#   4. benchmarks/step_timing.py: each kernel alone, µs per step vs cuDNN   STEP_LIMIT
#   5. the cupy GPU tests                                                   CUPY_TESTS_LIMIT
#   6. the plots                                                            PLOT_LIMIT
# A stage also stops where the total runs out; every stage runs even when an earlier one
# failed, and each prints a line per case as it finishes (pytest -v per test), so a stage
# stopped at its limit still says what passed. The exit status says whether all passed.
#
# Everything lands in $OUT (default ./out), seven files:
#   device_check.log   this whole run's output
#   gpu_tests.csv      per backend: passed / failed / incomplete / skipped on this card
#   results.csv        bench rows (append to benchmarks/results.csv)
#   step_timing.jsonl  one object per kernel-timing case
#   speedup_vs_batch.png  speedup_vs_hidden.png  memory.png
# then, in the checkout: append results.csv and gpu_tests.csv (without their headers) to
# the files of the same names in benchmarks/ and run `python -m gpurnn dispatch --write`.
#
# DRY_RUN=1: the same stages with tiny cases, for a machine without a GPU (the test suite
# runs it with a stand-in nvidia-smi on PATH). GPU tests run in one process at a time:
# persistent kernels from two processes would compete for the SMs.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-./out}
DRY_RUN=${DRY_RUN:-0}
# the dry run checks the script, not the GPU's times: on a CPU (maybe a busy one) every
# interpreter start alone takes seconds, so its default limits are ten times longer
slack=1
[ "$DRY_RUN" = 1 ] && slack=10
TOTAL_LIMIT=${TOTAL_LIMIT:-$((290 * slack))}
TRITON_TESTS_LIMIT=${TRITON_TESTS_LIMIT:-$((150 * slack))}
CHECK_LIMIT=${CHECK_LIMIT:-$((30 * slack))}
BENCH_LIMIT=${BENCH_LIMIT:-$((60 * slack))}
STEP_LIMIT=${STEP_LIMIT:-$((45 * slack))}
CUPY_TESTS_LIMIT=${CUPY_TESTS_LIMIT:-$((20 * slack))}
PLOT_LIMIT=${PLOT_LIMIT:-$((15 * slack))}
# cupy is left out of the timed rows while its backward is wrong: a crash there (illegal
# address) kills the CUDA context and every later row with it. Add gpurnn-cupy once fixed.
BENCH_ARGS=${BENCH_ARGS:---quick --backends cudnn,gpurnn-triton}
CHECK_ARGS=${CHECK_ARGS:-}
STEP_ARGS=${STEP_ARGS:-}
if [ "$DRY_RUN" = 1 ]; then
  BENCH_ARGS="--shapes lstm-T8-B2-H16 --dtypes fp32 --backends torch.nn,gpurnn-torch"
  CHECK_ARGS="--backends torch --dtypes fp32"
  STEP_ARGS="--dry-run --reps 1"
fi

mkdir -p "$OUT"
LOG="$OUT/device_check.log"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# from the checkout itself: nothing to install, nothing fetched (the machine is offline)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$DRY_RUN" = 1 ]; then
  # set before any process imports triton, so that no command has to restart itself
  export TRITON_INTERPRET=1
else
  unset TRITON_INTERPRET  # real kernels on the GPU
fi

failed=()
status=0
stage_log=""
stage() {  # stage NAME LIMIT COMMAND...: run under min(LIMIT, what is left), log per stage
  local name=$1 limit=$2
  shift 2
  local left=$((TOTAL_LIMIT - SECONDS))
  stage_log="$TMP/${name// /_}.log"
  : >"$stage_log"
  if [ "$left" -lt 5 ]; then
    echo "== $name: skipped, the ${TOTAL_LIMIT}s total is spent"
    failed+=("$name(skipped)")
    status=124
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  echo "== $name (limit ${limit}s, at ${start}s)"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$stage_log"
  status=${PIPESTATUS[0]}
  local took=$((SECONDS - start))
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "== $name: STOPPED at its ${limit}s limit (exit $status)"
  else
    echo "== $name: exit $status after ${took}s"
  fi
  [ "$status" -eq 0 ] || failed+=("$name($status)")
}

record_gpu_tests() {  # record_gpu_tests BACKEND: what the last pytest stage said, per card
  timeout 30 "$PY" -m gpurnn dispatch --record-gpu-tests "$1" --pytest-log "$stage_log" \
    --exit-status "$status" --gpu-tests "$OUT/gpu_tests.csv" ||
    echo "== recording the $1 GPU test outcome failed"
}

main() {
  echo "device check $(date -u +%Y-%m-%dT%H:%M:%SZ), total limit ${TOTAL_LIMIT}s, dry run: $DRY_RUN"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used \
    --format=csv || echo "nvidia-smi failed"
  # versions and backends (left out of the dry run: one interpreter start fewer)
  [ "$DRY_RUN" = 1 ] || timeout 30 "$PY" -m gpurnn info || echo "gpurnn info failed"

  local pytest=("$PY" -m pytest -v -rA -p no:cacheprovider)
  stage "triton gpu tests" "$TRITON_TESTS_LIMIT" \
    "${pytest[@]}" -m "gpu and not slow" tests/test_triton_gpu.py tests/test_triton_proj_gpu.py \
    tests/test_triton_plans_gpu.py
  record_gpu_tests triton
  # shellcheck disable=SC2086 # the *_ARGS are word lists
  stage "check" "$CHECK_LIMIT" "$PY" -m gpurnn check $CHECK_ARGS
  # rows are appended case by case, so a run cut short still leaves what it measured
  # shellcheck disable=SC2086
  stage "bench" "$BENCH_LIMIT" "$PY" -m gpurnn bench $BENCH_ARGS --csv "$OUT/results.csv"
  # shellcheck disable=SC2086
  stage "step timing" "$STEP_LIMIT" \
    "$PY" benchmarks/step_timing.py --out "$OUT/step_timing.jsonl" $STEP_ARGS
  stage "cupy gpu tests" "$CUPY_TESTS_LIMIT" \
    "${pytest[@]}" -m gpu --maxfail=10 tests/test_cupy_backend.py
  record_gpu_tests cupy
  stage "plot" "$PLOT_LIMIT" "$PY" -m gpurnn plot --csv "$OUT/results.csv" --out "$OUT"

  echo "== files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
  if [ ${#failed[@]} -ne 0 ]; then
    echo "device check: FAILED stages: ${failed[*]} (${SECONDS}s)"
    return 1
  fi
  echo "device check: all stages passed (${SECONDS}s)"
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
