#!/usr/bin/env bash
# The host CPU's check: what this machine's CPU is and, on an AVX-512 VNNI CPU, the CPU backend
# (csrc/cpu) run on it. bench/device_check.sh starts it in the background beside the GPU stages;
# alone, from the repository root:
#
#   bash bench/cpu_host_check.sh [--force] [--avx2-bench] [--set targets|smoke|quick|full]
#                                [--cores A,B] [--limit SECONDS] [--log-dir DIR] [--no-tests] [--no-bench]
#   bash bench/cpu_host_check.sh --pick-cores    # prints "A,B REST": the two CPUs it would use, the others
#
#   0. the CPU: model, CPU count, threads per core, whether avx512f / avx512bw / avx512vl /
#      avx512_vnni / amx_* are present. Without all four AVX-512 flags it says so and exits 0 at once
#      (--avx2-bench: build and a short benchmark anyway; --force or PTQRT_CPU_HOST_FORCE=1: the
#      whole path, tests included, as on an AVX-512 VNNI CPU)
#   1. build the cpu extension (ptqrt._build.build("cpu"), MAX_JOBS=2) and print the ISA path the
#      backend selects (torch.ops.ptqrt_cpu.best_isa / active_isa; PTQRT_CPU_ISA forces one)
#   2. the CPU backend's tests that need AVX-512 hardware (tests/test_cpu_backend.py: the avx512
#      parametrizations, skipped on other CPUs, and the tests that walk every path this CPU runs)
#   3. bench/bench_cpu.py with 2 threads (PTQRT_BENCH_THREADS=2), set "targets" by default: every row
#      a target of the CPU backend's issue is stated for, with only the peers the targets compare
#      (31 benchmarks, 6 more for w8a16 at M=128 and the AVX-512 diagnosis rows: the dot tiles at
#      M = 1 and 16, the VNNI kernels where the CPU has AMX, w8a16 on the AVX2 kernels; ~1 s each),
#      then the paired timings of a target's or a diagnosis row's two sides, alternating, 7 rounds
#      here (PTQRT_BENCH_PAIR_ROUNDS, CPU_HOST_PAIR_ROUNDS to change; the benchmark's own default is
#      15), ~0.3-2 s each; the load average before and after goes to the summary); "smoke" (one row
#      of each target kind) on a CPU without VNNI; --set or CPU_HOST_BENCH_SET picks another
#
# Every step runs pinned (taskset) to two CPUs on distinct physical cores, by default the
# highest-numbered ones this process may use (--cores or CPU_HOST_CORES: others), sees no GPU
# (CUDA_VISIBLE_DEVICES empty), and has a time limit cut from one overall limit (--limit or
# CPU_HOST_LIMIT, default 300 s), so the script ends within it. SIGTERM/SIGINT stop the running step
# (the benchmark through SIGINT, so it still prints and saves what it measured), then the summary is
# written as usual. CPU_HOST_BENCH_ARGS: extra pytest arguments for the benchmark (e.g. -k ...).
# Exit status 0 unless a step failed or ran out of time (a step stopped by a signal is no failure).
#
# Output: step logs cpu_build.log, cpu_test.log, cpu_bench.log and a short cpu_summary.txt in the
# log folder (--log-dir, else a new temporary folder); the benchmark's JSON in
# bench/results/cpu_<host>.json (CPU_HOST_JSON: another path). When OUT names a folder, the JSON is
# copied there, and the summary too unless --log-dir was given (bench/device_check.sh gives its own
# log folder, which it archives into logs.tgz, and prints the summary in its table).
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
FORCE=${PTQRT_CPU_HOST_FORCE:-0} AVX2_BENCH=0 SET=${CPU_HOST_BENCH_SET:-} CORES=${CPU_HOST_CORES:-} LIMIT=${CPU_HOST_LIMIT:-300}
LOGDIR="" TESTS=1 BENCH=1 PICK=0
usage="usage: bash bench/cpu_host_check.sh [--force] [--avx2-bench] [--set targets|smoke|quick|full] [--cores A,B] [--limit S] [--log-dir DIR] [--no-tests] [--no-bench] | --pick-cores"
while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1 ;;
        --avx2-bench) AVX2_BENCH=1 ;;
        --set) SET=${2:?$usage}; shift ;;
        --cores) CORES=${2:?$usage}; shift ;;
        --limit) LIMIT=${2:?$usage}; shift ;;
        --log-dir) LOGDIR=${2:?$usage}; shift ;;
        --no-tests) TESTS=0 ;;
        --no-bench) BENCH=0 ;;
        --pick-cores) PICK=1 ;;
        *) echo "$usage"; exit 2 ;;
    esac
    shift
done

pick_cores() {  # "A,B REST": two CPUs on distinct physical cores (highest first), and the other CPUs
    "$PY" - <<'PYEOF'
import os
cpus = sorted(os.sched_getaffinity(0))
def core(c):
    base = f"/sys/devices/system/cpu/cpu{c}/topology/"
    try:
        return tuple(open(base + f).read().strip() for f in ("physical_package_id", "core_id"))
    except OSError:
        return ("cpu", c)
picked, seen = [], set()
for c in reversed(cpus):
    if core(c) not in seen:
        picked.append(c)
        seen.add(core(c))
    if len(picked) == 2:
        break
if len(picked) < 2:  # one core with SMT: take its two threads
    picked = cpus[-2:]
rest = [c for c in cpus if c not in picked]
print(",".join(map(str, sorted(picked))), ",".join(map(str, rest)))
PYEOF
}
if [ "$PICK" = 1 ]; then
    pick_cores
    exit $?
fi

T0=$SECONDS
if [ -n "$LOGDIR" ]; then
    mkdir -p "$LOGDIR"
    OUT_SUMMARY=0
else
    LOGDIR=$(mktemp -d)
    OUT_SUMMARY=1
fi
SUMMARY="$LOGDIR/cpu_summary.txt"
JSON=""
: > "$SUMMARY"
note() { printf '%s\n' "$*" | tee -a "$SUMMARY"; }
copy_out() {  # the JSON (and the summary, when the logs are ours) into the device runner's folder
    if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
        [ -n "$JSON" ] && [ -f "$JSON" ] && cp "$JSON" "$OUT/"
        [ "$OUT_SUMMARY" = 1 ] && cp "$SUMMARY" "$OUT/cpu_summary.txt"
    fi
    return 0
}
# What the CPU stage runs must stay off the GPU (no context, no memory) and use two threads.
export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 PYTHONUNBUFFERED=1

# 0. the CPU ---------------------------------------------------------------------------------------
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has() { case "$flags" in *" $1 "*) echo yes ;; *) echo no ;; esac; }
model=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
[ -n "$model" ] || model=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ *//')
tpc=$(lscpu 2>/dev/null | sed -n 's/^Thread(s) per core: *//p' | head -1)
amx=$(for f in $flags; do case "$f" in amx*) printf '%s ' "$f" ;; esac; done)
VNNI=no
[ "$(has avx512f)$(has avx512bw)$(has avx512vl)$(has avx512_vnni)" = yesyesyesyes ] && VNNI=yes
note "cpu-host       ${model:-unknown CPU}; $(nproc) CPUs usable ($(nproc --all) online), ${tpc:-?} threads/core"
note "cpu-host       avx512f $(has avx512f), avx512bw $(has avx512bw), avx512vl $(has avx512vl), avx512_vnni $(has avx512_vnni), avx512_bf16 $(has avx512_bf16), avx_vnni $(has avx_vnni), amx: ${amx:-none}"
lscpu 2>/dev/null | grep -E "^(Model name|CPU\(s\)|On-line|Thread|Core|Socket|NUMA node|L2|L3|Flags)" > "$LOGDIR/cpu_lscpu.txt"

if [ "$VNNI" = no ]; then
    best=scalar
    [ "$(has avx2)$(has fma)$(has f16c)" = yesyesyes ] && best=avx2
    note "cpu-host       no AVX-512 VNNI (AVX-512 F, BW, VL and VNNI are all needed): the backend's path here is $best (from the flags); the avx512 tests cannot run"
    if [ "$FORCE" != 1 ] && [ "$AVX2_BENCH" != 1 ]; then
        note "cpu-host       nothing more to run (--avx2-bench: a short $best benchmark; --force: the whole path)"
        copy_out
        exit 0
    fi
    [ "$FORCE" = 1 ] || TESTS=0
    [ -n "$SET" ] || SET=smoke
fi
[ -n "$SET" ] || SET=targets

if [ -z "$CORES" ]; then
    read -r CORES _ <<<"$(pick_cores 2>/dev/null)"
fi
PIN=()
if command -v taskset >/dev/null && [ -n "$CORES" ]; then
    PIN=(taskset -c "$CORES")
    sib=$(for c in ${CORES//,/ }; do cat "/sys/devices/system/cpu/cpu$c/topology/thread_siblings_list" 2>/dev/null || echo "$c"; done | paste -sd' ')
    note "cpu-host       pinned to CPUs $CORES (SMT siblings: $sib), MAX_JOBS=2, 2 threads, overall limit ${LIMIT}s"
else
    note "cpu-host       not pinned (no taskset or no CPUs picked), MAX_JOBS=2, 2 threads, overall limit ${LIMIT}s"
fi

# Steps run in the background and are waited for, so a TERM/INT to this script reaches them at once.
STEP_PID="" STOPPED=0 FAILED=0 STEP_FAILED=0
# shellcheck disable=SC2329  # invoked by the trap below
on_signal() {
    STOPPED=1
    [ -n "$STEP_PID" ] && kill -INT "$STEP_PID" 2>/dev/null
}
trap on_signal TERM INT
left() { echo $((LIMIT - (SECONDS - T0) - 12)); }  # seconds a step may still take (12 s for the summary)
step() {  # step NAME MAX_SECONDS CMD...: run under min(MAX, what is left), log to cpu_NAME.log
    local name=$1 max=$2
    shift 2
    local limit t0=$SECONDS rc msg
    limit=$(left)
    [ "$limit" -gt "$max" ] && limit=$max
    STEP_FAILED=0
    if [ "$STOPPED" = 1 ] || [ "$limit" -lt 10 ]; then
        note "$(printf 'cpu-%-10s %-14s %4ds' "$name" "SKIPPED" 0) no time left"
        return 1
    fi
    echo "=== cpu-$name (limit ${limit}s)"
    timeout -s INT --kill-after=10 "$limit" "$@" > "$LOGDIR/cpu_$name.log" 2>&1 &
    STEP_PID=$!
    while :; do
        wait "$STEP_PID"
        rc=$?
        kill -0 "$STEP_PID" 2>/dev/null || break  # else the wait was cut short by a signal
    done
    STEP_PID=""
    msg=ok
    if [ "$STOPPED" = 1 ]; then
        msg="STOPPED"  # by the caller: not a failure of the step
    elif [ "$rc" -eq 124 ]; then
        msg="TIMED OUT" FAILED=1 STEP_FAILED=1
    elif [ "$rc" -ne 0 ]; then
        msg="FAILED rc=$rc" FAILED=1 STEP_FAILED=1
    fi
    STEP_MSG="$(printf 'cpu-%-10s %-14s %4ds' "$name" "$msg" $((SECONDS - t0)))"
    return "$rc"
}
fail_tail() {  # the end of a failed step's log, into the summary (it may be all that comes back)
    [ "$STEP_FAILED" = 1 ] && [ -f "$LOGDIR/cpu_$1.log" ] && tail -n "${2:-15}" "$LOGDIR/cpu_$1.log" | sed 's/^/    | /' >> "$SUMMARY"
}

# 1. build -------------------------------------------------------------------------------------------
ISA="?"
if step build 150 "${PIN[@]}" env MAX_JOBS=2 "$PY" -c "
from ptqrt import _build
import torch
print('library', _build.build('cpu', verbose=False))
o = torch.ops.ptqrt_cpu
print('isa', o.active_isa(), o.best_isa())"; then
    read -r _ ISA BEST <<<"$(grep '^isa ' "$LOGDIR/cpu_build.log" | tail -1)"
    note "$STEP_MSG ptqrt_cpu path ${ISA:-?} (best ${BEST:-?}; PTQRT_CPU_ISA=${PTQRT_CPU_ISA:-unset})"
else
    [ -n "${STEP_MSG:-}" ] && note "$STEP_MSG"
    fail_tail build 25
    TESTS=0 BENCH=0
fi

# 2. the tests that need AVX-512 hardware ------------------------------------------------------------
if [ "$TESTS" = 1 ]; then
    STEP_MSG=""
    targs=(-q -p no:cacheprovider -rfE -k "(avx512 and not emulated) or amx_switch_on_other or paths_agree or isa_env_is_checked or public_ops or avx_code_only")
    "$PY" -c "import pytest_timeout" 2>/dev/null && targs+=(--timeout 60)
    step test 90 "${PIN[@]}" "$PY" -m pytest "${targs[@]}" tests/test_cpu_backend.py
    [ -n "$STEP_MSG" ] && note "$STEP_MSG $(grep -E "passed|failed|error|skipped|no tests ran" "$LOGDIR/cpu_test.log" | tail -1)"
    fail_tail test 15
fi

# 3. benchmark -----------------------------------------------------------------------------------------
HOST=$(uname -n)
HOST=${HOST//[^A-Za-z0-9._-]/_}
BENCH_JSON=${CPU_HOST_JSON:-bench/results/cpu_${HOST:-host}.json}
if [ "$BENCH" = 1 ]; then
    STEP_MSG=""
    touch "$LOGDIR/cpu_bench.start"
    LOAD0=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)
    # shellcheck disable=SC2086  # CPU_HOST_BENCH_ARGS: extra pytest arguments, split on spaces
    step bench 400 "${PIN[@]}" env PTQRT_BENCH_THREADS=2 PTQRT_BENCH_SET="$SET" PTQRT_BENCH_JSON="$BENCH_JSON" \
        PTQRT_BENCH_PAIR_ROUNDS="${CPU_HOST_PAIR_ROUNDS:-7}" \
        "$PY" -m pytest bench/bench_cpu.py --benchmark-enable -s -q -p no:cacheprovider ${CPU_HOST_BENCH_ARGS:-}
    [ -n "$STEP_MSG" ] && note "$STEP_MSG set $SET, 2 threads, $(grep -E "passed|failed|error|no tests ran|KeyboardInterrupt" "$LOGDIR/cpu_bench.log" | tail -1)"
    # The whole machine's load (the GPU stages share it): other work changes timings between rows.
    note "cpu-bench      load average (1, 5, 15 min) before ${LOAD0:-?}, after $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
    if [ -f "$BENCH_JSON" ] && [ "$BENCH_JSON" -nt "$LOGDIR/cpu_bench.start" ]; then
        JSON=$BENCH_JSON
        # The targets as the benchmark printed them at its end, else from its JSON (partial when the
        # run was cut short); prefixed for the caller's table.
        if grep -q '^targets: ' "$LOGDIR/cpu_bench.log"; then
            sed -n '/^targets (/,/^targets: /p' "$LOGDIR/cpu_bench.log"
        else
            PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 20 "${PIN[@]}" "$PY" bench/bench_cpu.py "$JSON" 2>&1
        fi | sed 's/^/cpu /' | tee -a "$SUMMARY"
    else
        note "cpu-bench      no JSON written"
    fi
    fail_tail bench 15
fi

verdict=ok
[ "$STOPPED" = 1 ] && verdict=STOPPED
[ "$FAILED" = 1 ] && verdict=FAILED
note "$(printf 'cpu-%-10s %-14s %4ds' total "$verdict" $((SECONDS - T0))) logs in $LOGDIR"
copy_out
exit "$FAILED"
