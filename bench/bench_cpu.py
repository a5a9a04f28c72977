"""CPU backend benchmarks (pytest-benchmark): each ptqrt op against its peers, in one process.

    python -m pytest bench/bench_cpu.py --benchmark-enable -s                    # quick subset
    PTQRT_BENCH_FULL=1 python -m pytest bench/bench_cpu.py --benchmark-enable -s # the whole sweep
    PTQRT_BENCH_SET=targets python -m pytest ...   # only the rows and peers the targets need
    PTQRT_BENCH_THREADS=1 ... --benchmark-timer=time.process_time                # on a shared machine
    python bench/bench_cpu.py bench/results/cpu_<host>.json   # print the targets of a (partial) JSON

PTQRT_BENCH_SET picks the sweep: quick (the default), full (= PTQRT_BENCH_FULL=1), targets (every
row a target of the CPU backend's issue is stated for, with only the peers those targets name: w8a8
at M 1/16/128 for the three shapes against fbgemm, plus fp32 F.linear at M=128; w8a16 fp32 x at M=1;
attention at L=4096 for B 1 and 8), or smoke (one row of each target kind at the smallest shape, to
check the plumbing). PTQRT_BENCH_JSON overrides where the JSON goes.

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
At the end a summary prints medians, the ratios the issue asks for, and the memory floor (bytes moved
/ the copy bandwidth measured in the same run), then each target of the issue with its ratio and PASS
or MISS (targets are stated for a 2-core AVX-512 VNNI machine: read them with the CPU model, ISA path
and thread count printed beside them). All of it is also written to bench/results/cpu_<host>.json,
which is rewritten (without floors, "partial": true) after every row, so a run cut short keeps what it
measured. Timings are medians; nothing here asserts a timing.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ptqrt import _build

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
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
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
# A diagnosis row on AVX-512 VNNI CPUs: quantize + w8a8 at M = 16 with the dot-product tiles instead of the
# panel kernel (PTQRT_CPU_VNNI_PANEL_ROWS past M), beside the default.
DOT_TILES = "ptqrt quant+w8a8 dot tiles"


@pytest.mark.parametrize("m,n,k,impl", [(m, n, k, i) for m in MS for n, k in NKS for i in W8A8_IMPLS
                                          if _needed("w8a8", m, n, k, i)]
                         + [(16, n, k, DOT_TILES) for n, k in NKS if 16 in MS and SET in ("full", "targets")])
def test_w8a8(benchmark, ops, m, n, k, impl, monkeypatch):
    torch.manual_seed(0)
    group = f"w8a8 M={m} N={n} K={k}"
    benchmark.group = group
    x = torch.randn(m, k)
    w = torch.randn(n, k) * 0.02
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    w_s = torch.rand(n) * 0.01
    x_q, x_s = ops.quantize_per_token(x, None)
    if impl == DOT_TILES:
        if ops.active_isa() not in ("avx512", "avx512-emulated"):
            pytest.skip("the dot-tile row is a diagnosis of the AVX-512 VNNI path")
        monkeypatch.setenv("PTQRT_CPU_VNNI_PANEL_ROWS", str(m + 1))
    if impl in ("ptqrt quant+w8a8", DOT_TILES):
        def fn():
            q, s = ops.quantize_per_token(x, None)
            return ops.w8a8_gemm(q, s, w_q, w_s, None, torch.float32)
        nbytes = n * k + m * k * 5 + m * n * 4
    elif impl == "ptqrt w8a8_gemm":
        fn = lambda: ops.w8a8_gemm(x_q, x_s, w_q, w_s, None, torch.float32)  # noqa: E731
        nbytes = n * k + m * k + m * n * 4
    elif impl == "fbgemm dynamic":
        lin = torch.nn.Linear(k, n, bias=False)
        lin.weight.data.copy_(w)
        qlin = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        fn = lambda: qlin(x)  # noqa: E731
        nbytes = n * k + m * k * 4 + m * n * 4
    elif impl == "torch._int_mm":
        wt = w_q.t()
        try:
            torch._int_mm(x_q, wt)
        except RuntimeError as e:
            pytest.skip(f"torch._int_mm refuses M={m} here: {str(e).splitlines()[0]}")
        fn = lambda: torch._int_mm(x_q, wt)  # noqa: E731
        nbytes = n * k + m * k + m * n * 4
    else:
        fn = lambda: F.linear(x, w)  # noqa: E731
        nbytes = n * k * 4 + m * k * 4 + m * n * 4
    with torch.inference_mode():
        benchmark(fn)
    _record(benchmark, group, impl, nbytes)


# ----------------------------------------------------------------------------------------- w8a16
W8A16_IMPLS = ("ptqrt w8a16 fp32 x", "ptqrt w8a16 bf16 x", "fp32 F.linear", "bf16 F.linear")


@pytest.mark.parametrize("m,n,k,impl", [(m, n, k, i) for m in MS for n, k in NKS for i in W8A16_IMPLS
                                          if _needed("w8a16", m, n, k, i)])
def test_w8a16(benchmark, ops, m, n, k, impl):
    torch.manual_seed(0)
    group = f"w8a16 M={m} N={n} K={k}"
    benchmark.group = group
    x = torch.randn(m, k)
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    w_s = torch.rand(n) * 0.01
    if impl.startswith("ptqrt"):
        xx = x if "fp32" in impl else x.bfloat16()
        fn = lambda: ops.w8a16_gemm(xx, w_q, w_s, None, 0)  # noqa: E731
        nbytes = n * k + m * k * xx.element_size() + m * n * xx.element_size()
    else:
        dt = torch.float32 if impl.startswith("fp32") else torch.bfloat16
        xx, w = x.to(dt), (w_q.float() * w_s[:, None]).to(dt)
        fn = lambda: F.linear(xx, w)  # noqa: E731
        nbytes = n * k * w.element_size() + (m * k + m * n) * xx.element_size()
    with torch.inference_mode():
        benchmark(fn)
    _record(benchmark, group, impl, nbytes)


# ------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("b,length,kv_heads,impl",
                         [(b, length, HEADS, i) for b, length in ATTN for i in ("ptqrt int8-KV decode", "fp32 SDPA")
                          if _needed("attn", b, length, None, i)]
                         + [(b, length, GQA_KV_HEADS, i) for b, length in ATTN_GQA
                            for i in ("ptqrt int8-KV decode", "fp32 SDPA")])
def test_decode_attention(benchmark, ops, b, length, kv_heads, impl):
    torch.manual_seed(0)
    group = _group("attn", b, length, None) if kv_heads == HEADS else \
        f"attn B={b} L={length} H={HEADS}/{kv_heads} D={HEAD_DIM}"
    benchmark.group = group
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
        nbytes = 2 * kc.numel() + 2 * ks.numel() * 4
    else:
        k = torch.randn(b, kv_heads, length, HEAD_DIM)
        v = torch.randn(b, kv_heads, length, HEAD_DIM)
        q4 = q[:, :, None, :]
        gqa = {"enable_gqa": True} if kv_heads != HEADS else {}
        fn = lambda: F.scaled_dot_product_attention(q4, k, v, scale=sm, **gqa)  # noqa: E731
        nbytes = 2 * k.numel() * 4
    with torch.inference_mode():
        benchmark(fn)
    _record(benchmark, group, impl, nbytes)


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


def targets(results: dict) -> list[dict]:
    """Every target of the CPU backend's issue, with its ratio where both rows were measured."""
    out = []
    for kind, ours, peer, need, a, b, c in TARGETS:
        group = _group(kind, a, b, c)
        rows = results.get(group, {})
        ratio = None
        if ours in rows and peer in rows and rows[ours]["median_s"] > 0:
            ratio = rows[peer]["median_s"] / rows[ours]["median_s"]
        status = "n/a" if ratio is None else ("PASS" if ratio >= need else "MISS")
        out.append({"group": group, "ours": ours, "peer": peer, "need": need, "ratio": ratio, "status": status})
    return out


def target_lines(meta: dict, tgts: list[dict]) -> list[str]:
    """The targets table: a header saying where it was measured, one PASS/MISS line per measured target."""
    cpus = meta.get("cpus") or []
    lines = [f"targets (CPU backend issue; stated for a 2-core AVX-512 VNNI machine): {meta.get('device')}, "
             f"path {meta.get('isa')} (best {meta.get('best_isa')}), {meta.get('threads')} threads on CPUs "
             f"{','.join(map(str, cpus)) or '?'}, set {meta.get('set')}"]
    for t in tgts:
        if t["ratio"] is not None:
            lines.append(f"{t['status']:<5} {t['group']:<32} {t['ours']} vs {t['peer']}: "
                         f"{t['ratio']:.2f}x (target >= {t['need']:g}x)")
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
                               "targets": targets(_results), "results": _results}, indent=1))
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
             f"{'group':<32} {'impl':<22} {'median ms':>10} {'floor ms':>9}"]
    for group, rows in _results.items():
        for name, r in rows.items():
            r["floor_s"] = r["bytes"] / bw
            lines.append(f"{group:<32} {name:<22} {r['median_s'] * 1e3:>10.3f} {r['floor_s'] * 1e3:>9.3f}")
        for ours, peer in RATIOS[group.split()[0]]:
            if ours in rows and peer in rows:
                ratio = rows[peer]["median_s"] / rows[ours]["median_s"]
                rows.setdefault("ratios", {})[f"{ours} vs {peer}"] = ratio
                lines.append(f"{'':<32} speed-up of {ours} over {peer}: {ratio:.2f}x")
    lines += target_lines(meta, targets(_results))
    print("\n" + "\n".join(lines))
    out = _write_json(meta, partial=False, bw=bw)
    print(f"wrote {out}")


if __name__ == "__main__":  # print the targets of a JSON this file wrote (a partial one too)
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python bench/bench_cpu.py bench/results/cpu_<host>.json")
    data = json.loads(Path(sys.argv[1]).read_text())
    print("\n".join(target_lines(data, targets(data.get("results", {})))
                    + (["(partial: the run stopped before its end)"] if data.get("partial") else [])))
