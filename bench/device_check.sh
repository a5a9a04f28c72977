#!/usr/bin/env bash
# One GPU check, sized for under 6 minutes on one H100 (torch 2.11 / triton 3.6 / Python 3.12, no
# network). Run from the repository root:   bash bench/device_check.sh [--quick]
#
#   1. install the checkout (editable, no deps, no build isolation) so that ptqrt and ptqrt.kernels
#      import; kernels/ becomes ptqrt.kernels only through setup.py's package_dir
#   2. build the CUDA extension when csrc/cuda has sources                (the CUDA section below)
#   3. pytest -m gpu tests/ -- every backend's GPU tests, the CUDA ones included (in parallel with
#      pytest-xdist when present: the time goes mostly to Triton compiles)
#   4. the GPU benchmark (python -m ptqrt.bench_gpu): every op against cuBLAS / _int_mm / SDPA
#   5. a short table: stage times, test results, the targets
#
# Results go to bench/results/ and, when the variable OUT names a folder (the device runner's),
# are copied there too. Each stage has its own time limit so that a hang cannot eat the others.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
QUICK=""
[ "${1:-}" = "--quick" ] && QUICK="--quick"
PY=${PYTHON:-python3}
LOG=$(mktemp -d)
touch "$LOG/start"
RESULTS=bench/results
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
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

echo "=== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
"$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())"

# 1. install ------------------------------------------------------------------------------------
if ! stage install 120 "$PY" -m pip install --no-build-isolation --no-deps --no-index -q -e . ; then
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
    || { echo "ptqrt.kernels does not import; stopping"; exit 1; }

# 2. CUDA extension -----------------------------------------------------------------------------
# >>> CUDA backend (csrc/cuda) -- this section belongs to the CUDA backend's owner, who sizes it.
# >>> It builds the extension with the project's builder (MAX_JOBS above) when csrc/cuda has
# >>> sources; its GPU tests run with everyone else's in stage 3 (pytest -m gpu tests/), and a
# >>> successful build adds "cuda" to the backends the benchmark times in the same run.
BACKENDS=triton
if ls csrc/cuda/*.cu >/dev/null 2>&1 && [ -z "${SKIP_CUDA:-}" ]; then
    # build (cached by content hash) + compute-sanitizer memcheck at small sizes; its GPU tests run in stage 3
    stage cuda 330 env PTQRT_CUDA_CHECK_NO_TESTS=1 bash bench/device_check_cuda.sh && BACKENDS=triton,cuda
fi
# <<< end of the CUDA section

# 3. GPU tests ----------------------------------------------------------------------------------
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"
stage gpu-tests 180 "$PY" -m pytest -m gpu -q -p no:cacheprovider $XDIST tests/

# 4. benchmark ----------------------------------------------------------------------------------
stage bench 150 "$PY" -m ptqrt.bench_gpu $QUICK --plot --out-dir "$RESULTS" --backends "$BACKENDS"

# 5. summary ------------------------------------------------------------------------------------
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    find "$RESULTS" -name 'gpu_*' -newer "$LOG/start" -exec cp {} "$OUT"/ \;
    for f in "$LOG"/*.log; do cp "$f" "$OUT/log_$(basename "$f")"; done
fi
echo
echo "=== summary"
printf '%s\n' "${summary[@]}"
grep -E "passed|failed|error" "$LOG/gpu-tests.log" | tail -1
sed -n '/^targets/,$p' "$LOG/bench.log" 2>/dev/null | grep -E "targets|PASS|MISS"
echo "total ${SECONDS}s"
