#!/usr/bin/env bash
# The CUDA backend's part of the device check: bench/device_check.sh calls it from its CUDA section,
# or run it alone from the repository root:   bash bench/device_check_cuda.sh
#
#   1. build the extension with the project's builder (ninja, sm_80 + sm_90a; cached by content hash)
#   2. pytest -m gpu tests/test_cuda_backend.py: every op against the reference at real and odd sizes,
#      including the sm_90a wgmma kernel (the default for M > 64 on compute capability 9.0)
#   3. compute-sanitizer --tool memcheck over the same tests at the small odd sizes
#      (PTQRT_CUDA_TEST_SMALL=1), one dtype per op (every kernel path: GEMV, both tiles, split-K,
#      wgmma, fallbacks, padding), with torch's caching allocator off so that every overrun leaves
#      its own allocation; skipped, with a message, when compute-sanitizer is not installed
#
# Sizing on one H100 (predicted, not yet measured): build ~60-90 s cold on 16 cores (cached by content
# hash afterwards), tests ~30 s, memcheck ~60-120 s. From bench/device_check.sh, whose stage 3 runs
# the GPU tests already:   stage cuda 330 env PTQRT_CUDA_CHECK_NO_TESTS=1 bash bench/device_check_cuda.sh
# PTQRT_CUDA_MEMCHECK=0 skips stage 3. Exit status: 0 when every stage that ran passed. Logs go to
# $OUT (the device runner's folder) when set.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
LOG=${CUDA_CHECK_LOG:-${OUT:-$(mktemp -d)}}
status=0
run() {  # run NAME SECONDS CMD...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "=== cuda-$name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > >(tee "$LOG/cuda_$name.log") 2>&1
    local rc=$?
    local msg="ok"
    [ "$rc" -ne 0 ] && msg="FAILED rc=$rc" && status=1
    [ "$rc" -eq 124 ] && msg="TIMED OUT"
    printf '=== cuda-%-10s %-14s %4ds\n' "$name" "$msg" $((SECONDS - t0))
    return "$rc"
}

# PTQRT_CUDA_NO_BUILD=1: the caller built it already (a cached build only loads, but skip even that).
if [ "${PTQRT_CUDA_NO_BUILD:-0}" != "1" ]; then
    run build 300 "$PY" -c "from ptqrt import _build; print(_build.build('cuda', verbose=False))" || exit 1
fi

# PTQRT_CUDA_CHECK_NO_TESTS=1: the caller runs tests/test_cuda_backend.py itself (pytest -m gpu tests/).
if [ "${PTQRT_CUDA_CHECK_NO_TESTS:-0}" != "1" ]; then
    run tests 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs tests/test_cuda_backend.py
fi

SAN=$(command -v compute-sanitizer || true)
[ -z "$SAN" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ] && SAN="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
if [ "${PTQRT_CUDA_MEMCHECK:-1}" = "0" ]; then
    echo "=== cuda-memcheck skipped (PTQRT_CUDA_MEMCHECK=0)"
elif [ -n "$SAN" ]; then
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 PTQRT_CUDA_TEST_SMALL=1 \
        run memcheck "${MEMCHECK_LIMIT:-200}" "$SAN" --tool memcheck --error-exitcode 7 --print-limit 20 \
        "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_cuda_backend.py \
        -k "(dtype0 or out_dtype3 or int32 or unaligned or (w8a16 and dtype2)) and not tune"
else
    echo "=== cuda-memcheck skipped: compute-sanitizer not found (install the CUDA toolkit's sanitizer)"
fi
exit $status
