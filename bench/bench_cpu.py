"""CPU backend benchmarks (pytest-benchmark): each ptqrt op against its peers, in one process.

    python -m pytest bench/bench_cpu.py --benchmark-enable -s                    # quick subset
    PTQRT_BENCH_FULL=1 python -m pytest bench/bench_cpu.py --benchmark-enable -s # the whole sweep
    PTQRT_BENCH_SET=targets python -m pytest ...   # the rows and peers the targets need (+ diagnosis)
    PTQRT_BENCH_THREADS=1 ... --benchmark-timer=time.process_time                # on a shared machine
    python bench/bench_cpu.py bench/results/cpu_<host>.json   # print the targets of a (partial) JSON

PTQRT_BENCH_SET picks the sweep: quick (the default), full (= PTQRT_BENCH_FULL=1), targets (every
row a target of the CPU backend's issue is stated for, with only the peers those targets name: w8a8
at M 1/16/128 for the three shapes against fbgemm, plus fp32 F.linear at M=128; w8a16 fp32 x at M=1;
attention at L=4096 for B 1 and 8; on AVX-512 CPUs also the diagnosis rows below, with w8a16 fp32 x
and fp32 F.linear at M=128 beside the w8a16 ones), or smoke (one row of each target kind at the
smallest shape, to check the plumbing). PTQRT_BENCH_JSON overrides where the JSON goes; PTQRT_BENCH_PAIR_ROUNDS the paired rounds (15).

(The project's pytest config passes --benchmark-disable; --benchmark-enable turns timing back on.)
On a machine shared with other work, wall-clock medians of multi-threaded runs measure the
scheduler: one thread and CPU time (process_time) give stable ratios.

Groups (one pytest-benchmark group per shape, so its table shows each row's ratio to the fastest):
  w8a8   ptqrt quantize_per_token + w8a8_gemm (fp32 out) | w8a8_gemm alone | torch fbgemm dynamic
         int8 Linear (quantize_dynamic) | torch._int_mm (int8 in, int32 out) | fp32 F.linear
  w8a16  ptqrt w8a16_gemm (fp32 and bf16 activations) | fp32 F.linear | bf16 F.linear
  attn   ptqrt int8_kv_decode_attention (paged, block 16, dynamic scales) | fp32 SDPA on a dense cache;
         32 heads of 128, and in the quick and full sets also 32 query heads on 8 kv heads (GQA, no
         target; SDPA with enable_gqa)
  diagnosis (AVX-512 VNNI CPUs, targets and full sets): "ptqrt quant+w8a8" with one cpu-backend knob
         set, beside the default: dot tiles at M=1 and 16, the VNNI kernels at
         M=16 and 128 where the AMX tile kernel is the default (see DIAGNOSIS); w8a16 on the AVX2
         kernels at M=1 and 128 beside the default AVX-512 ones (W16_AVX2)
  paired (last): every target's two rows, and each diagnosis row against the default, timed once more
         alternately in the same seconds (see paired_times), so a change of load between two rows
         cannot make their ratio; printed beside the target's own ratio, which decides PASS / MISS
At the end a summary prints medians, the ratios the issue asks for, and the memory floor (bytes moved
/ the copy bandwidth measured in the same run), then each target of the issue with its ratio and PASS
or MISS (targets are stated for a 2-core AVX-512 VNNI machine: read them with the CPU model, ISA path
and thread count printed beside them). All of it is also written to bench/results/cpu_<host>.json,
which is rewritten (without floors, "partial": true) after every row, so a run cut short keeps what it
measured. Timings are medians; nothing here asserts a timing.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ptqrt import _build
from ptqrt.bench import environ

SETS = ("quick", "full", "targets", "smoke")
SET = "full" if os.environ.get("PTQRT_BENCH_FULL", "0") == "1" else os.environ.get("PTQRT_BENCH_SET", "quick")
if SET not in SETS:
    raise ValueError(f"PTQRT_BENCH_SET must be one of {SETS}; got {SET!r}")
FULL = SET == "full"
ALL_MS = (1, 16, 128)
ALL_NKS = ((4096, 4096), (11008, 4096), (4096, 11008))
MS = {"full": ALL_MS, "targets": ALL_MS, "quick": (1, 128), "smoke": (1,)}[SET]
NKS = ALL_NKS if SET in ("full", "targets") else ((4096, 4096),)
ATTN = {"full": tuple((b, l) for b in (1, 8) for l in (512, 4096)), "targets": ((1, 4096), (8, 4096)),
        "quick": ((1, 4096), (8, 512)), "smoke": ((1, 4096),)}[SET]
HEADS, HEAD_DIM, BLOCK = 32, 128, 16
# GQA rows (no target: for the record): 32 query heads on 8 kv heads, as Llama-3-8B.
GQA_KV_HEADS = 8
ATTN_GQA = {"full": ATTN, "quick": ((1, 4096),)}.get(SET, ())

# The CPU backend's issue: (kind, ours, peer, at least this speed-up, the rows it is stated for).
TARGETS = (
    [("w8a8", "ptqrt quant+w8a8", "fbgemm dynamic", 1.2, m, n, k) for m in ALL_MS for n, k in ALL_NKS]
    + [("w8a8", "ptqrt quant+w8a8", "fp32 F.linear", 4.0, 128, n, k) for n, k in ALL_NKS]
    + [("w8a16", "ptqrt w8a16 fp32 x", "fp32 F.linear", 2.0, 1, n, k) for n, k in ALL_NKS]
    + [("attn", "ptqrt int8-KV decode", "fp32 SDPA", 1.5, b, 4096, None) for b in (1, 8)]
)


def _group(kind: str, a: int, b: int, c) -> str:
    """The benchmark group of a row: (m, n, k) for the GEMMs, (batch, length) for attention."""
    if kind == "attn":
        return f"attn B={a} L={b} H={HEADS} D={HEAD_DIM}"
    return f"{kind} M={a} N={b} K={c}"


def _needed(kind: str, a: int, b: int, c, impl: str) -> bool:
    """In the targets and smoke sets, only the implementations some target of that row compares."""
    if SET in ("full", "quick"):
        return True
    return any(t[0] == kind and t[4:] == (a, b, c) and impl in t[1:3] for t in TARGETS)

_results: dict = {}
if os.environ.get("PTQRT_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["PTQRT_BENCH_THREADS"]))


@pytest.fixture(scope="module")
def ops():
    if _build.load("cpu") is None:
        _build.build("cpu", verbose=True)  # raises with the compiler's log
    return torch.ops.ptqrt_cpu


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        field = {l.split(":", 1)[0].strip(): l.split(":", 1)[1].strip() for l in out.splitlines() if ":" in l}
        name = field["Model name"]  # a VM's is often bare ("AMD EPYC"): the family says which generation
        return f"{name} (family {field['CPU family']} model {field['Model']})" if "CPU family" in field else name
    except Exception:  # noqa: BLE001 -- any failure: fall back to the platform string
        return platform.processor() or "unknown CPU"


def _record(benchmark, group: str, name: str, nbytes: int = 0) -> None:
    _results.setdefault(group, {})[name] = {"median_s": benchmark.stats.stats.median, "bytes": nbytes}
    try:  # keep what was measured if the run is cut short
        _write_json(_meta(), partial=True)
    except Exception as e:  # noqa: BLE001 -- the record matters more than its copy on disk
        print(f"bench_cpu: could not write the partial JSON: {e}")


def _copy_bandwidth() -> float:
    """Bytes per second of a 256 MiB tensor copy (read + write), median of 5, all threads."""
    src = torch.ones(64 << 20, dtype=torch.float32)
    dst = torch.empty_like(src)
    ts = []
    for _ in range(6):
        t = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / sorted(ts[1:])[2]


# ------------------------------------------------------------------------------------------ w8a8
W8A8_IMPLS = ("ptqrt quant+w8a8", "ptqrt w8a8_gemm", "fbgemm dynamic", "torch._int_mm", "fp32 F.linear")
# Diagnosis rows on AVX-512 VNNI CPUs, beside the default "ptqrt quant+w8a8" (each the same op with one
# environment setting of the cpu backend; AMX off in the first, which diagnoses the VNNI kernels):
#   dot tiles  M = 1, 16: the dot-product tiles on w as it is instead of the GEMV form (M = 1) or the
#              panel kernel (M = 16) on the cached quads (the crossover past M)
#   vnni       M = 16, 128: the VNNI panel kernel where the AMX-INT8 tile kernel is the default (CPUs
#              with AMX)
DOT_TILES = "ptqrt quant+w8a8 dot tiles"
NO_AMX = "ptqrt quant+w8a8 vnni"
DIAGNOSIS = {DOT_TILES: ((1, 16), lambda m: {"PTQRT_CPU_VNNI_PANEL_ROWS": str(m + 1), "PTQRT_CPU_AMX": "0"}),
             NO_AMX: ((16, 128), lambda m: {"PTQRT_CPU_AMX": "0"})}
DIAG_ROWS = [(m, n, k, impl) for impl, (ms, _) in DIAGNOSIS.items() for m in ms for n, k in NKS
             if m in MS and SET in ("full", "targets")]
_AMX_PROBE: list = []


def _amx_probe(ops) -> str:
    """'' when the AMX tile kernel ran exactly in a child process (the default rows run it in this one
    from 16 rows where the CPU has AMX; the "vnni" diagnosis rows, AMX off, are timed only then), else
    why not. Once per run."""
    if not _AMX_PROBE:
        if not ops.has_amx():
            _AMX_PROBE.append("this CPU (or its OS) offers no AMX-INT8 tiles")
        else:
            code = ("import torch; from ptqrt import _build; _build.load('cpu'); o = torch.ops.ptqrt_cpu; "
                    "x = torch.randint(-128, 128, (40, 300), dtype=torch.int8); "
                    "w = torch.randint(-128, 128, (70, 300), dtype=torch.int8); "
                    "y = o.w8a8_gemm(x, torch.ones(40), w, torch.ones(70), None, torch.int32); "
                    "assert torch.equal(y, (x.long() @ w.long().t()).int()); print(o.last_w8a8_path())")
            root = Path(__file__).resolve().parent.parent
            path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
            env = {**os.environ, "PTQRT_CPU_AMX": "1", "PYTHONPATH": path}
            try:
                r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
                ok = r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == ["amx"]
                _AMX_PROBE.append("" if ok else f"the AMX probe failed (rc {r.returncode}): "
                                  f"{((r.stderr.strip() or r.stdout.strip()).splitlines() or ['?'])[-1]}")
            except subprocess.TimeoutExpired:
                _AMX_PROBE.append("the AMX probe timed out")
    return _AMX_PROBE[0]


def w8a8_case(ops, m: int, n: int, k: int, impl: str):
    """(fn, bytes it moves at least, environment it runs under) for one w8a8 row."""
    torch.manual_seed(0)
    x = torch.randn(m, k)
    w = torch.randn(n, k) * 0.02
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    w_s = torch.rand(n) * 0.01
    x_q, x_s = ops.quantize_per_token(x, None)
    env = {}
    if impl in DIAGNOSIS:
        if ops.active_isa() not in ("avx512", "avx512-emulated"):
            pytest.skip(f"the {impl!r} row is a diagnosis of the AVX-512 VNNI path")
        if impl == NO_AMX and _amx_probe(ops):
            pytest.skip(_amx_probe(ops))
        env = DIAGNOSIS[impl][1](m)
    if impl == "ptqrt quant+w8a8" or impl in DIAGNOSIS:
        def fn():
            q, s = ops.quantize_per_token(x, None)
            return ops.w8a8_gemm(q, s, w_q, w_s, None, torch.float32)
        return fn, n * k + m * k * 5 + m * n * 4, env
    if impl == "ptqrt w8a8_gemm":
        return (lambda: ops.w8a8_gemm(x_q, x_s, w_q, w_s, None, torch.float32)), n * k + m * k + m * n * 4, env
    if impl == "fbgemm dynamic":
        lin = torch.nn.Linear(k, n, bias=False)
        lin.weight.data.copy_(w)
        qlin = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        return (lambda: qlin(x)), n * k + m * k * 4 + m * n * 4, env
    if impl == "torch._int_mm":
        wt = w_q.t()
        try:
            torch._int_mm(x_q, wt)
        except RuntimeError as e:
            pytest.skip(f"torch._int_mm refuses M={m} here: {str(e).splitlines()[0]}")
        return (lambda: torch._int_mm(x_q, wt)), n * k + m * k + m * n * 4, env
    return (lambda: F.linear(x, w)), n * k * 4 + m * k * 4 + m * n * 4, env


@pytest.mark.parametrize("m,n,k,impl", [(m, n, k, i) for m in MS for n, k in NKS for i in W8A8_IMPLS
                                          if _needed("w8a8", m, n, k, i)] + DIAG_ROWS)
def test_w8a8(benchmark, ops, m, n, k, impl, monkeypatch):
    group = f"w8a8 M={m} N={n} K={k}"
    benchmark.group = group
    fn, nbytes, env = w8a8_case(ops, m, n, k, impl)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with torch.inference_mode():
        benchmark(fn)
    _record(benchmark, group, impl, nbytes)


# ----------------------------------------------------------------------------------------- w8a16
W8A16_IMPLS = ("ptqrt w8a16 fp32 x", "ptqrt w8a16 bf16 x", "fp32 F.linear", "bf16 F.linear")


# Diagnosis rows on AVX-512 CPUs (targets and full sets): w8a16 on the AVX2 kernels
# (PTQRT_CPU_W8A16_AVX512=0) beside the default AVX-512 ones: the tiles at M = 1, the panels at M = 128
# (there the targets set also times the default and fp32 F.linear, which no target names).
W16_AVX2 = "ptqrt w8a16 fp32 x avx2 kernels"
W16_DIAG_MS = (1, 128)
W16_DIAG_ROWS = [(m, n, k, W16_AVX2) for m in W16_DIAG_MS for n, k in NKS if m in MS and SET in ("full", "targets")]
W16_DIAG_PEERS = [(m, n, k, i) for m, n, k, _ in W16_DIAG_ROWS for i in ("ptqrt w8a16 fp32 x", "fp32 F.linear")
                  if not _needed("w8a16", m, n, k, i)]


def w8a16_case(ops, m: int, n: int, k: int, impl: str):
    torch.manual_seed(0)
    x = torch.randn(m, k)
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    w_s = torch.rand(n) * 0.01
    env = {}
    if impl == W16_AVX2:
        if ops.active_isa() != "avx512":
            pytest.skip(f"the {impl!r} row is a diagnosis of the AVX-512 path")
        env = {"PTQRT_CPU_W8A16_AVX512": "0"}
    if impl.startswith("ptqrt"):
        xx = x if "fp32" in impl else x.bfloat16()
        nbytes = n * k + m * k * xx.element_size() + m * n * xx.element_size()
        return (lambda: ops.w8a16_gemm(xx, w_q, w_s, None, 0)), nbytes, env
    dt = torch.float32 if impl.startswith("fp32") else torch.bfloat16
    xx, w = x.to(dt), (w_q.float() * w_s[:, None]).to(dt)
    return (lambda: F.linear(xx, w)), n * k * w.element_size() + (m * k + m * n) * xx.element_size(), {}


@pytest.mark.parametrize("m,n,k,impl", [(m, n, k, i) for m in MS for n, k in NKS for i in W8A16_IMPLS
                                          if _needed("w8a16", m, n, k, i)] + W16_DIAG_PEERS + W16_DIAG_ROWS)
def test_w8a16(benchmark, ops, m, n, k, impl, monkeypatch):
    group = f"w8a16 M={m} N={n} K={k}"
    benchmark.group = group
    if (m, n, k, impl) in W16_DIAG_PEERS and ops.active_isa() != "avx512":
        pytest.skip("a peer of the AVX-512 w8a16 diagnosis rows only")
    fn, nbytes, env = w8a16_case(ops, m, n, k, impl)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with torch.inference_mode():
        benchmark(fn)
    _record(benchmark, group, impl, nbytes)


# ------------------------------------------------------------------------------------- attention
def attn_case(ops, b: int, length: int, kv_heads: int, impl: str):
    torch.manual_seed(0)
    q = torch.randn(b, HEADS, HEAD_DIM)
    sm = HEAD_DIM ** -0.5
    if impl.startswith("ptqrt"):
        nblk = b * length // BLOCK
        kc = torch.randint(-127, 128, (nblk, BLOCK, kv_heads, HEAD_DIM), dtype=torch.int8)
        vc = torch.randint(-127, 128, (nblk, BLOCK, kv_heads, HEAD_DIM), dtype=torch.int8)
        ks, vs = torch.rand(nblk, BLOCK, kv_heads) * 0.02, torch.rand(nblk, BLOCK, kv_heads) * 0.02
        bt = torch.randperm(nblk, dtype=torch.int32).reshape(b, length // BLOCK)
        sl = torch.full((b,), length, dtype=torch.int32)
        fn = lambda: ops.int8_kv_decode_attention(q, kc, vc, ks, vs, bt, sl, sm)  # noqa: E731
        return fn, 2 * kc.numel() + 2 * ks.numel() * 4, {}
    k = torch.randn(b, kv_heads, length, HEAD_DIM)
    v = torch.randn(b, kv_heads, length, HEAD_DIM)
    q4 = q[:, :, None, :]
    gqa = {"enable_gqa": True} if kv_heads != HEADS else {}
    return (lambda: F.scaled_dot_product_attention(q4, k, v, scale=sm, **gqa)), 2 * k.numel() * 4, {}


@pytest.mark.parametrize("b,length,kv_heads,impl",
                         [(b, length, HEADS, i) for b, length in ATTN for i in ("ptqrt int8-KV decode", "fp32 SDPA")
                          if _needed("attn", b, length, None, i)]
                         + [(b, length, GQA_KV_HEADS, i) for b, length in ATTN_GQA
                            for i in ("ptqrt int8-KV decode", "fp32 SDPA")])
def test_decode_attention(benchmark, ops, b, length, kv_heads, impl):
    group = _group("attn", b, length, None) if kv_heads == HEADS else \
        f"attn B={b} L={length} H={HEADS}/{kv_heads} D={HEAD_DIM}"
    benchmark.group = group
    fn, nbytes, _ = attn_case(ops, b, length, kv_heads, impl)
    with torch.inference_mode():
        benchmark(fn)
    _record(benchmark, group, impl, nbytes)


# ---------------------------------------------------------------------------------------- paired
# pytest-benchmark times each row on its own, one after the other: on a host shared with other work
# (the GPU machine's CPU check runs beside compiles and GPU tests) the load can change between a row
# and its peer, and their ratio with it. So every target's two rows (and each diagnosis row against
# the default) are timed once more, alternating: samples a, b, b, a, a, b, ... of at least
# PAIR_SAMPLE_S each, every sample after one untimed call (whatever the other side evicted from the
# caches comes back outside the timing, as in pytest-benchmark's steady state). The paired ratio is
# the peer's median over ours, printed beside each target's; the targets' PASS / MISS stays the
# pytest-benchmark ratio's, as the issue states them. PTQRT_BENCH_PAIR_ROUNDS sets the rounds (15: on
# the 2-core Zen 4 box, whose L3 and memory other tenants share, 7 rounds moved a ratio by 10-20%
# between runs, and the rows that read the 45 MB weights from memory the most).
PAIR_SAMPLE_S = 0.02
PAIR_ROUNDS = int(os.environ.get("PTQRT_BENCH_PAIR_ROUNDS") or 15)


def _pairs() -> list[tuple]:
    """(kind, ours, peer, row args) for every target and diagnosis row this set measures."""
    out = []
    for kind, ours, peer, _, a, b, c in TARGETS:
        if kind in ("w8a8", "w8a16") and a in MS and (b, c) in NKS and _needed(kind, a, b, c, ours) \
                and _needed(kind, a, b, c, peer):
            out.append((kind, ours, peer, (a, b, c)))
        elif kind == "attn" and (a, b) in ATTN:
            out.append((kind, ours, peer, (a, b, HEADS)))
    return (out + [("w8a8", impl, "ptqrt quant+w8a8", (m, n, k)) for m, n, k, impl in DIAG_ROWS]
            + [("w8a16", impl, "ptqrt w8a16 fp32 x", (m, n, k)) for m, n, k, impl in W16_DIAG_ROWS])


def paired_times(a, b, rounds: int = PAIR_ROUNDS, sample_s: float = PAIR_SAMPLE_S) -> tuple[list, list]:
    """Seconds per call of a and of b, `rounds` samples each, taken alternately (a, b, b, a, ...).
    a and b are (fn, env) pairs; a sample is one untimed call and then enough timed calls to last
    sample_s (counted from one call of each, after a first call that may pack or warm up)."""
    def one(side, calls):
        fn, env = side
        with environ(env):
            fn()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            return (time.perf_counter() - t) / calls

    calls = [max(1, math.ceil(sample_s / max(one(side, 1), 1e-9))) for side in (a, b)]
    times: tuple[list, list] = ([], [])
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            times[i].append(one((a, b)[i], calls[i]))
    return times


_paired: dict = {}
_CASES = {"w8a8": w8a8_case, "w8a16": w8a16_case, "attn": attn_case}


@pytest.mark.parametrize("kind,ours,peer,args", _pairs(), ids=lambda v: str(v).replace(" ", "_"))
def test_paired(request, ops, kind, ours, peer, args):
    if request.config.getoption("benchmark_disable", False) and not request.config.getoption("benchmark_enable", False):
        pytest.skip("the paired timing runs with --benchmark-enable")
    group = _group(kind, *args) if kind != "attn" else _group("attn", args[0], args[1], None)
    rows = _results.get(group, {})
    if ours not in rows or peer not in rows:
        pytest.skip(f"{group}: {ours if ours not in rows else peer} was not measured in this run")
    fa, _, env_a = _CASES[kind](ops, *args, ours)
    fb, _, env_b = _CASES[kind](ops, *args, peer)
    with torch.inference_mode():
        ta, tb = paired_times((fa, env_a), (fb, env_b))
    ma, mb = statistics.median(ta), statistics.median(tb)
    _paired.setdefault(group, {})[f"{ours} vs {peer}"] = {"ratio": mb / ma, "ours_median_s": ma, "peer_median_s": mb,
                                                          "rounds": len(ta)}
    try:
        _write_json(_meta(), partial=True)
    except Exception as e:  # noqa: BLE001
        print(f"bench_cpu: could not write the partial JSON: {e}")


# --------------------------------------------------------------------------------------- summary
RATIOS = {  # (group prefix, ours, peer): the targets of the CPU backend's issue
    "w8a8": [("ptqrt quant+w8a8", "fbgemm dynamic"), ("ptqrt quant+w8a8", "fp32 F.linear"),
             ("ptqrt w8a8_gemm", "torch._int_mm")],
    "w8a16": [("ptqrt w8a16 fp32 x", "fp32 F.linear"), ("ptqrt w8a16 bf16 x", "bf16 F.linear")],
    "attn": [("ptqrt int8-KV decode", "fp32 SDPA")],
}


def _json_path() -> Path:
    if os.environ.get("PTQRT_BENCH_JSON"):
        return Path(os.environ["PTQRT_BENCH_JSON"])
    return Path(__file__).resolve().parent / "results" / f"cpu_{platform.node() or 'host'}.json"


_META: dict = {}


def _meta() -> dict:
    """Where the numbers come from: CPU model, ISA paths, threads, the CPUs this process may use."""
    if not _META:
        ops = torch.ops.ptqrt_cpu
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = []
        _META.update({"device": _cpu_model(), "isa": ops.active_isa(), "best_isa": ops.best_isa(),
                      "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": cpus,
                      "set": SET, "full": FULL})
    return _META


def targets(results: dict, paired: dict | None = None) -> list[dict]:
    """Every target of the CPU backend's issue, with its ratio where both rows were measured (and the
    paired timing's ratio where that ran)."""
    out = []
    for kind, ours, peer, need, a, b, c in TARGETS:
        group = _group(kind, a, b, c)
        rows = results.get(group, {})
        ratio = None
        if ours in rows and peer in rows and rows[ours]["median_s"] > 0:
            ratio = rows[peer]["median_s"] / rows[ours]["median_s"]
        status = "n/a" if ratio is None else ("PASS" if ratio >= need else "MISS")
        pr = (paired or {}).get(group, {}).get(f"{ours} vs {peer}")
        out.append({"group": group, "ours": ours, "peer": peer, "need": need, "ratio": ratio, "status": status,
                    "paired": pr["ratio"] if pr else None})
    return out


def target_lines(meta: dict, tgts: list[dict], paired: dict | None = None) -> list[str]:
    """The targets table: a header saying where it was measured, one PASS/MISS line per measured target,
    a line per diagnosis row timed against the default (paired), then the count."""
    cpus = meta.get("cpus") or []
    lines = [f"targets (CPU backend issue; stated for a 2-core AVX-512 VNNI machine): {meta.get('device')}, "
             f"path {meta.get('isa')} (best {meta.get('best_isa')}), {meta.get('threads')} threads on CPUs "
             f"{','.join(map(str, cpus)) or '?'}, set {meta.get('set')}"]
    for t in tgts:
        if t["ratio"] is not None:
            pr = "" if t.get("paired") is None else f"; paired {t['paired']:.2f}x"
            lines.append(f"{t['status']:<5} {t['group']:<32} {t['ours']} vs {t['peer']}: "
                         f"{t['ratio']:.2f}x (target >= {t['need']:g}x{pr})")
    for group, pairs in (paired or {}).items():
        for name, pr in pairs.items():
            variant, default = name.split(" vs ")
            if variant in DIAGNOSIS or variant == W16_AVX2:  # > 1: the variant is faster than the default
                lines.append(f"diagnosis {group:<32} {variant}: {pr['ratio']:.2f}x the default's speed (paired)")
    missing = sum(t["ratio"] is None for t in tgts)
    n_pass = sum(t["status"] == "PASS" for t in tgts)
    lines.append(f"targets: {n_pass} PASS, {len(tgts) - n_pass - missing} MISS, {missing} not measured "
                 f"(of {len(tgts)}; PTQRT_BENCH_SET=targets measures all)")
    return lines


def _write_json(meta: dict, partial: bool, bw: float | None = None) -> Path:
    out = _json_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({**meta, "copy_bandwidth_Bps": bw, "partial": partial,
                               "targets": targets(_results, _paired), "results": _results, "paired": _paired},
                              indent=1))
    tmp.replace(out)
    return out


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if not _results:
        return
    bw = _copy_bandwidth()
    meta = _meta()
    lines = [f"device: {meta['device']}, ptqrt_cpu path {meta['isa']}, torch {torch.__version__}, "
             f"{meta['threads']} threads, "
             f"copy bandwidth {bw / 1e9:.1f} GB/s",
             f"{'group':<32} {'impl':<28} {'median ms':>10} {'floor ms':>9}"]
    for group, rows in _results.items():
        for name, r in rows.items():
            r["floor_s"] = r["bytes"] / bw
            lines.append(f"{group:<32} {name:<28} {r['median_s'] * 1e3:>10.3f} {r['floor_s'] * 1e3:>9.3f}")
        for ours, peer in RATIOS[group.split()[0]]:
            if ours in rows and peer in rows:
                ratio = rows[peer]["median_s"] / rows[ours]["median_s"]
                rows.setdefault("ratios", {})[f"{ours} vs {peer}"] = ratio
                lines.append(f"{'':<32} speed-up of {ours} over {peer}: {ratio:.2f}x")
    lines += target_lines(meta, targets(_results, _paired), _paired)
    print("\n" + "\n".join(lines))
    out = _write_json(meta, partial=False, bw=bw)
    print(f"wrote {out}")


if __name__ == "__main__":  # print the targets of a JSON this file wrote (a partial one too)
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/bench_cpu.py bench/results/cpu_<host>.json")
    data = json.loads(Path(sys.argv[1]).read_text())
    print("\n".join(target_lines(data, targets(data.get("results", {}), data.get("paired")), data.get("paired"))
                    + (["(partial: the run stopped before its end)"] if data.get("partial") else [])))
