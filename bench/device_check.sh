#!/usr/bin/env bash
# One GPU check: 147-200 s on one H100 80GB HBM3 (measured 2026-11-26; torch 2.11 / triton 3.6 /
# Python 3.12, no network). Run from the repository root:
#
#   bash bench/device_check.sh [--quick] [--no-tests] [--no-bench] [--ops w8a16_gemm,...]
#
#   1. install the checkout (editable, no deps, no build isolation) so that ptqrt and ptqrt.kernels
#      import; kernels/ becomes ptqrt.kernels only through setup.py's package_dir
#   2. build the CUDA extension in the background (ninja, sm_80 + sm_90a) while the Triton GPU tests
#      run (pytest -m gpu tests/test_triton_backend.py, in parallel with pytest-xdist when present)
#   3. the CUDA backend's GPU tests and the other GPU tests, then compute-sanitizer memcheck over the
#      CUDA tests at small odd sizes (bench/device_check_cuda.sh)
#   4. the GPU benchmark (python -m ptqrt.bench_gpu): every op against cuBLAS / _int_mm / SDPA, each
#      row printed as it is measured and the JSON/CSV rewritten after each op
#   5. a short table: stage times, test results, the targets
#
# Every stage has its own time limit (so a hang cannot eat the others); the limits add up to under
# 9 minutes. Results go to bench/results/; when the variable OUT names a folder (the device
# runner's), the benchmark's files, the summary and one archive of all logs are copied there.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
QUICK="" TESTS=1 BENCH=1 OPS="w8a16_gemm,int8_kv_decode_attention,quantize_per_token,w8a8_gemm,quantize_per_tensor,kv_cache_append"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK="--quick" ;;
        --no-tests) TESTS=0 ;;
        --no-bench) BENCH=0 ;;
        --ops) OPS=$2; shift ;;
        *) echo "usage: bash bench/device_check.sh [--quick] [--no-tests] [--no-bench] [--ops a,b]"; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-python3}
LOG=$(mktemp -d)
touch "$LOG/start"
RESULTS=bench/results
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-12}
summary=()
stage() {  # stage NAME SECONDS CMD...: run with a time limit, log, record the outcome
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOG/$name.log"
    local rc=${PIPESTATUS[0]}
    local msg="ok"
    [ "$rc" -ne 0 ] && msg="FAILED rc=$rc"
    [ "$rc" -eq 124 ] && msg="TIMED OUT"
    summary+=("$(printf '%-14s %-14s %4ds' "$name" "$msg" $((SECONDS - t0)))")
    return "$rc"
}
finish() {
    {
        echo "=== summary"
        printf '%s\n' "${summary[@]}"
        for f in "$LOG"/*tests*.log; do
            [ -f "$f" ] && printf '%-22s %s\n' "$(basename "$f" .log)" "$(grep -E "passed|failed|error|skipped" "$f" | tail -1)"
        done
        sed -n '/^targets/,$p' "$LOG/bench.log" 2>/dev/null | grep -E "targets|PASS|MISS"
        echo "total ${SECONDS}s"
    } | tee "$LOG/summary.txt"
    if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
        find "$RESULTS" -name 'gpu_*' -newer "$LOG/start" -exec cp {} "$OUT"/ \;
        cp "$LOG/summary.txt" "$OUT/"
        tar czf "$OUT/logs.tgz" -C "$LOG" . 2>/dev/null
    fi
}

echo "=== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
"$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())"

# 1. install ------------------------------------------------------------------------------------
if ! stage install 90 "$PY" -m pip install --no-build-isolation --no-deps --no-index -q -e . ; then
    # Fallback without an install: a sitecustomize on PYTHONPATH maps ptqrt.kernels to kernels/, as
    # setuptools' editable finder would (ptqrt itself imports from the repository root).
    SITE=$(mktemp -d)
    cat > "$SITE/sitecustomize.py" <<PYEOF
import importlib.abc, importlib.util, sys
class _KernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "ptqrt.kernels":
            return None
        return importlib.util.spec_from_file_location(name, "$ROOT/kernels/__init__.py",
                                                      submodule_search_locations=["$ROOT/kernels"])
sys.meta_path.insert(0, _KernelsFinder())
PYEOF
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "pip install failed: mapping ptqrt.kernels through $SITE/sitecustomize.py"
fi
"$PY" -c "import ptqrt, ptqrt.kernels; print('ptqrt from', ptqrt.__file__, '| kernels:', sorted(ptqrt.kernels.OPS))" \
    || { echo "ptqrt.kernels does not import; stopping"; finish; exit 1; }

PYTEST=("$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 120)
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 6)

# 2. CUDA build in the background, Triton GPU tests meanwhile ----------------------------------
BACKENDS=triton
BUILD_PID=""
if ls csrc/cuda/*.cu >/dev/null 2>&1 && [ -z "${SKIP_CUDA:-}" ]; then
    (timeout --kill-after=10 300 "$PY" -c "from ptqrt import _build; print(_build.build('cuda', verbose=False))" \
        > "$LOG/cuda-build.log" 2>&1; echo $? > "$LOG/cuda-build.rc") &
    BUILD_PID=$!
fi
[ "$TESTS" = 1 ] && stage triton-tests 150 "${PYTEST[@]}" "${XDIST[@]}" tests/test_triton_backend.py
if [ -n "$BUILD_PID" ]; then
    t0=$SECONDS
    wait "$BUILD_PID"
    rc=$(cat "$LOG/cuda-build.rc" 2>/dev/null || echo 1)
    echo "=== cuda-build (background) rc=$rc"; tail -25 "$LOG/cuda-build.log"
    summary+=("$(printf '%-14s %-14s %4ds' cuda-build "$([ "$rc" = 0 ] && echo ok || echo "FAILED rc=$rc")" $((SECONDS - t0)))")
    [ "$rc" = 0 ] && BACKENDS=triton,cuda
fi

# 3. CUDA and the other GPU tests, memcheck -----------------------------------------------------
if [ "$TESTS" = 1 ]; then
    stage cuda-tests 120 "${PYTEST[@]}" "${XDIST[@]}" --ignore=tests/test_triton_backend.py tests/
    [ "$BACKENDS" = triton,cuda ] && stage memcheck 100 env PTQRT_CUDA_CHECK_NO_TESTS=1 PTQRT_CUDA_NO_BUILD=1 MEMCHECK_LIMIT=85 CUDA_CHECK_LOG="$LOG" \
        bash bench/device_check_cuda.sh
fi

# 4. benchmark ----------------------------------------------------------------------------------
# DEADLINE (seconds from the start): the benchmark gets what is left of it, so the summary and the
# files still reach $OUT when the caller's own limit is near.
left=$(( ${DEADLINE:-540} - SECONDS - 15 ))
limit=${BENCH_LIMIT:-240}
[ "$left" -lt "$limit" ] && limit=$left
[ "$BENCH" = 1 ] && [ "$limit" -gt 30 ] && stage bench "$limit" "$PY" -m ptqrt.bench_gpu $QUICK --plot --out-dir "$RESULTS" \
    --backends "$BACKENDS" --ops "$OPS"

# 5. summary ------------------------------------------------------------------------------------
echo
finish
