#!/usr/bin/env bash
# One GPU check: 229 s on one H100 80GB HBM3 (2026-11-27, version 3: 8 kernel variants, the flush
# probe, the K sweep, three Nsight Compute runs, the decode benchmark and the tune stage; the
# benchmark itself 62 s; torch 2.11 / triton 3.6 / Python 3.12, no network). Run from the repository
# root:
#
#   bash bench/device_check.sh [--quick] [--no-tests] [--no-bench] [--no-cpu] [--ops w8a16_gemm,...]
#
#   1. install the checkout (editable, no deps, no build isolation) so that ptqrt and ptqrt.kernels
#      import; kernels/ becomes ptqrt.kernels only through setup.py's package_dir; then, in the
#      background for the rest of the run, the host CPU's check (bench/cpu_host_check.sh) on two CPUs
#      of its own (the highest-numbered, on distinct physical cores; on an AVX-512 VNNI CPU every
#      later stage is kept off them): the CPU model and its AVX-512 / AMX flags and, on an AVX-512
#      VNNI CPU, the cpu extension's build (MAX_JOBS=2), the CPU backend's AVX-512 tests and
#      bench/bench_cpu.py's target rows at 2 threads (131-135 s there on 2026-11-27, the whole CPU
#      check 172-180 s: limit CPU_LIMIT, 300 s). Without VNNI it only reports the CPU (a second). --no-cpu or SKIP_CPU=1 leaves it out
#   2. build the CUDA extension in the background (ninja, sm_80 + sm_90a) while the Triton GPU tests
#      run (pytest -m gpu tests/test_triton_backend.py, in parallel with pytest-xdist when present)
#   3. the CUDA backend's GPU tests and the other GPU tests, then compute-sanitizer memcheck over the
#      CUDA tests at small odd sizes (bench/device_check_cuda.sh)
#   4. the GPU benchmark (python -m ptqrt.bench_gpu): every op against cuBLAS / _int_mm / SDPA, each
#      row printed as it is measured and the JSON/CSV rewritten after each op; with the CUDA
#      extension built, the kernel variants named in BACKENDS below (see bench_gpu.VARIANTS)
#      are timed beside the defaults
#   4a. with the CUDA extension built: the sm_90a w8a8 GEMM's time over K at 8192 x 8192 (its fixed
#      cost a tile; bench/diag_gpu.py --k-sweep; at least 100 s left before DEADLINE), then Nsight
#      Compute over one call of each CUDA kernel that misses a target (bench/diag_gpu.py --ncu, in
#      three runs; NCU_LIMIT, 90 s, at least 85 s left); a stage left out says why in the summary
#   4b. with at least 45 s left before DEADLINE and transformers installed: bench/bench_decode.py on
#      the GPU (the tiny Llama's eager greedy decode, fp16 against each quantized form: the host work
#      around the kernels), then one generate of the int8-KV form profiled: host time per token by
#      function and every call that waited for the GPU (it cost 1.9-2.5 ms a token over fp16 there)
#   4c. with the CUDA extension built and at least 90 s left before DEADLINE: `ptqrt tune` (eager
#      mode; all ops), the table written to
#      bench/results/tables/<GPU>.json (PTQRT_TABLE_DIR), for ptqrt/data/tables once reviewed
#   5. a short table: stage times, test results, the targets; then the CPU check's lines (its
#      stages, the CPU backend's targets with PASS/MISS), after a wait of at most CPU_WAIT (60 s)
#      for it if it is still running (then it is stopped, and keeps what it measured)
#
# Every stage has its own time limit (so a hang cannot eat the others); the limits add up to under
# 9 minutes, the wait for the CPU check included. Results go to bench/results/; when the variable
# OUT names a folder (the device runner's), the GPU benchmark's files, the CPU benchmark's JSON
# (cpu_<host>.json), the decode benchmark's and the tuned table's JSON and one archive of all logs
# (the summary included) are copied there: 7 files, under the device runner's 8 with the caller's log.
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
CPU=1
[ -n "${SKIP_CPU:-}" ] && [ "${SKIP_CPU:-}" != 0 ] && CPU=0
# The benchmark's ops in this order: the short ones first, w8a8_gemm (the most rows, and the Triton
# kernels' autotuning, TMA and pointer) last, so a benchmark cut short by its limit loses the fewest ops.
QUICK="" TESTS=1 BENCH=1 OPS="w8a16_gemm,int8_kv_decode_attention,quantize_per_token,kv_cache_append,quantize_per_tensor,w8a8_gemm"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK="--quick" ;;
        --no-tests) TESTS=0 ;;
        --no-bench) BENCH=0 ;;
        --no-cpu) CPU=0 ;;
        --ops) OPS=$2; shift ;;
        *) echo "usage: bash bench/device_check.sh [--quick] [--no-tests] [--no-bench] [--no-cpu] [--ops a,b]"; exit 2 ;;
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
CPU_PID="" CPU_T0=0
skipped() {  # skipped NAME WHY: a stage left out, in the summary
    summary+=("$(printf '%-14s %-14s %4ds' "$1" skipped 0) ($2)")
}
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
cpu_start() {  # the host CPU's check in the background, pinned to two CPUs that later stages keep off
    local limit=${CPU_LIMIT:-300} cores="" rest="" pin=()
    read -r cores rest <<<"$(bash bench/cpu_host_check.sh --pick-cores 2>/dev/null)"
    command -v taskset >/dev/null && [ -n "$cores" ] && pin=(taskset -c "$cores")
    CPU_T0=$SECONDS
    timeout --kill-after=15 "$limit" "${pin[@]}" bash bench/cpu_host_check.sh ${cores:+--cores "$cores"} \
        --limit $((limit - 10)) --log-dir "$LOG" > "$LOG/cpu_host.log" 2>&1 &
    CPU_PID=$!
    echo "=== cpu-host (in the background, limit ${limit}s) on CPUs ${cores:-any}; log cpu_host.log"
    # Every later stage (children inherit this shell's CPU set) keeps off those two CPUs, where the
    # check will benchmark (an AVX-512 VNNI CPU) and enough CPUs are left.
    if [ ${#pin[@]} -gt 0 ] && [ -n "$rest" ] && [ "$(nproc)" -ge 8 ] && grep -qw avx512_vnni /proc/cpuinfo; then
        taskset -pc "$rest" $$ >/dev/null 2>&1 && echo "    the GPU stages run on CPUs $rest"
    fi
    return 0
}
cpu_wait() {  # wait (bounded) for the background CPU check; stop it if it is still running
    [ -n "$CPU_PID" ] || return 0
    local t0=$SECONDS most=${CPU_WAIT:-60} msg=ok rc
    local left=$(( ${DEADLINE:-540} - SECONDS - 25 ))
    [ "$left" -lt "$most" ] && most=$left
    kill -0 "$CPU_PID" 2>/dev/null && echo "=== cpu-host still running: waiting at most ${most}s"
    while kill -0 "$CPU_PID" 2>/dev/null && [ $((SECONDS - t0)) -lt "$most" ]; do sleep 1; done
    if kill -0 "$CPU_PID" 2>/dev/null; then
        msg=STOPPED
        kill -TERM "$CPU_PID" 2>/dev/null  # passed on by timeout: the check stops its step, writes its summary
        local t1=$SECONDS
        while kill -0 "$CPU_PID" 2>/dev/null && [ $((SECONDS - t1)) -lt 12 ]; do sleep 1; done
        kill -KILL -- "-$CPU_PID" 2>/dev/null  # timeout's own process group
    fi
    wait "$CPU_PID"
    rc=$?
    if [ "$msg" = ok ] && [ "$rc" -eq 124 ]; then msg="TIMED OUT"; elif [ "$msg" = ok ] && [ "$rc" -ne 0 ]; then msg="FAILED rc=$rc"; fi
    summary+=("$(printf '%-14s %-14s %4ds' cpu-host "$msg" $((SECONDS - t0))) waited at the end (started at ${CPU_T0}s; its own lines below)")
    CPU_PID=""
}
finish() {
    cpu_wait
    {
        echo "=== summary"
        printf '%s\n' "${summary[@]}"
        for f in "$LOG"/*tests*.log; do
            [ -f "$f" ] && printf '%-22s %s\n' "$(basename "$f" .log)" "$(grep -E "passed|failed|error|skipped" "$f" | tail -1)"
        done
        sed -n '/^targets/,$p' "$LOG/bench.log" 2>/dev/null | grep -E "targets|PASS|MISS|FAIL"
        sed -n '/^tiny Llama greedy decode/,/^wrote/p' "$LOG/decode.log" 2>/dev/null | grep -v '^wrote'
        grep -h "waited for the GPU" "$LOG/decode.log" 2>/dev/null
        grep -h -A3 "^w8a8_gemm M=8192 N=8192" "$LOG/ksweep.log" 2>/dev/null
        cat "$LOG"/ncu-*.log 2>/dev/null | grep -E "ncu: profiled|Context [0-9]+, Stream|^    Duration|DRAM Throughput|L2 Cache Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per Thread" \
            | head -150
        cat "$LOG/cpu_summary.txt" 2>/dev/null
        echo "total ${SECONDS}s"
    } | tee "$LOG/summary.txt"
    if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
        find "$RESULTS" \( -name 'gpu_*' -o -name 'cpu_*.json' -o -name 'decode_*.json' -o -path '*/tables/*.json' \) \
            -newer "$LOG/start" \
            -exec cp {} "$OUT"/ \;
        # (the device runner brings back at most 8 files: the summary travels in logs.tgz and stdout)
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

# 1b. the host CPU's check, in the background on two CPUs of its own ----------------------------
[ "$CPU" = 1 ] && cpu_start

PYTEST=("$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 120)
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 6)

# 2. CUDA build in the background, Triton GPU tests meanwhile ----------------------------------
BACKENDS=triton,triton-pointer CUDA_OK=0
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
    # The variants (bench_gpu.VARIANTS): cuda-decode-mma, the tensor-core decode (opt-in,
    # PTQRT_CUDA_DECODE_MMA=1); cuda-quant-recip, the quantizers' reciprocal form (opt-in,
    # PTQRT_CUDA_QUANT_RECIPROCAL=1); cuda-w8a16-wave, the sm_90a w8a16 split-K capped at one wave
    # (opt-in, PTQRT_CUDA_W8A16_WAVE_CAP=1); and the kernels a new default replaced, timed beside it:
    # triton-pointer: the Triton w8a8 pointer kernel at M >= 2048 (PTQRT_TRITON_TMA=0);
    # cuda-append-row: kv_cache_append's warp-a-row kernel (PTQRT_CUDA_APPEND_KERNEL=row); cuda-old-tiles: the sm_90a w8a8 GEMM one CTA a tile with the older
    # width rule (PTQRT_CUDA_TILE_WAVES=0 PTQRT_CUDA_SM90_PERSISTENT=0).
    [ "$rc" = 0 ] && CUDA_OK=1 && BACKENDS=triton,triton-pointer,cuda,cuda-decode-mma,cuda-quant-recip,cuda-w8a16-wave,cuda-old-tiles,cuda-append-row
fi

# 3. CUDA and the other GPU tests, memcheck -----------------------------------------------------
if [ "$TESTS" = 1 ]; then
    stage cuda-tests 150 "${PYTEST[@]}" "${XDIST[@]}" --ignore=tests/test_triton_backend.py tests/
    [ "$CUDA_OK" = 1 ] && stage memcheck 100 env PTQRT_CUDA_CHECK_NO_TESTS=1 PTQRT_CUDA_NO_BUILD=1 MEMCHECK_LIMIT=85 CUDA_CHECK_LOG="$LOG" \
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
# 4a. the sm_90a w8a8 GEMM's fixed cost a tile: 8192 x 8192 over K, default (persistent) and one CTA a tile
# (bench/diag_gpu.py --k-sweep; ~15-20 s), with at least 100 s left before DEADLINE
if [ "$BENCH" = 1 ] && [ "$CUDA_OK" = 1 ]; then
    if [ $(( ${DEADLINE:-540} - SECONDS )) -ge 100 ]; then
        stage ksweep 40 env PTQRT_NO_BUILD=1 \
            "$PY" bench/diag_gpu.py --cases none --k-sweep --backends cuda,cuda:PTQRT_CUDA_SM90_PERSISTENT=0
    else
        skipped ksweep "under 100 s left"
    fi
fi

# then Nsight Compute counters of the CUDA kernels that miss their targets (SOL, memory, compute,
# occupancy, launch, warp-state sections; one call each, bench/diag_gpu.py --ncu), in three runs with
# limits of their own (ncu prints its report when the program exits: a run cut short loses its
# kernels, not the others'): decode at B = 16 and 1; w8a8 at 8192^3 and M = 512 x 11008 and the
# w8a16 GEMVs at M = 1 and 16 on 28672 x 8192; quantize_per_token 8192^2 and kv_cache_append, with
# the quantizers' reciprocal form (PTQRT_CUDA_QUANT_RECIPROCAL=1) beside the default. At most NCU_LIMIT (90 s) together, what DEADLINE leaves after 40 s for
# the summary, and not below 45 s.
NCU=(ncu --clock-control none --profile-from-start off --nvtx
     --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis
     --section Occupancy --section LaunchStats --section WarpStateStats)
if [ "$BENCH" = 1 ] && [ "$CUDA_OK" = 1 ]; then
    left=$(( ${DEADLINE:-540} - SECONDS - 40 ))
    limit=${NCU_LIMIT:-90}
    [ "$left" -lt "$limit" ] && limit=$left
    if ! command -v ncu >/dev/null; then
        skipped ncu "no ncu on PATH"
    elif [ "$limit" -lt 45 ]; then
        skipped ncu "under 85 s left"
    else
        each=$((limit / 3))
        stage ncu-decode "$each" env PTQRT_NO_BUILD=1 "${NCU[@]}" "$PY" bench/diag_gpu.py --ncu \
            --backends cuda,cuda:PTQRT_CUDA_DECODE_MMA=1 --cases decode_b16_4096,decode_b1_4096
        stage ncu-gemm "$each" env PTQRT_NO_BUILD=1 "${NCU[@]}" "$PY" bench/diag_gpu.py --ncu --backends cuda \
            --cases w8a8_m8192_8192,w8a8_m512_11008,w8a16_m1_28672,w8a16_m16_28672
        stage ncu-quant "$each" env PTQRT_NO_BUILD=1 "${NCU[@]}" "$PY" bench/diag_gpu.py --ncu \
            --backends cuda,cuda:PTQRT_CUDA_QUANT_RECIPROCAL=1 --cases quant_m8192_8192,append_t4096
    fi
fi

# 4b. end-to-end eager decode of the tiny Llama (host work around the kernels: QuantLinear, the int8
# KV cache's store), only with what is left before DEADLINE (at least 45 s; at most 60)
# (30 s kept for the summary; PTQRT_NO_BUILD: it uses the extensions stage 2 built, never builds)
left=$(( ${DEADLINE:-540} - SECONDS - 30 ))
[ "$left" -gt 60 ] && left=60
if [ "$BENCH" = 1 ] && "$PY" -c "import transformers" 2>/dev/null; then
    if [ "$left" -ge 45 ]; then
        stage decode "$left" \
            env PTQRT_NO_BUILD=1 "$PY" bench/bench_decode.py --device cuda --tokens 32 --rounds 3 --profile "int8 KV" \
            --json "$RESULTS/decode_cuda_$(hostname 2>/dev/null || echo host).json"
    else
        skipped decode "under 75 s left"
    fi
fi

# 4c. `ptqrt tune` (eager mode: launch cost counted) with what is still left before DEADLINE (at
# least 90 s; at most 150): the auto table for this GPU, into bench/results/tables (and $OUT)
left=$(( ${DEADLINE:-540} - SECONDS - 30 ))
[ "$left" -gt 150 ] && left=150
if [ "$BENCH" = 1 ] && [ "$CUDA_OK" = 1 ]; then
    if [ "$left" -ge 90 ]; then
        stage tune "$left" env PTQRT_NO_BUILD=1 PTQRT_TABLE_DIR="$RESULTS/tables" "$PY" -m ptqrt tune
    else
        skipped tune "under 120 s left"
    fi
fi

# 5. summary ------------------------------------------------------------------------------------
echo
finish
