"""GPU benchmarks behind `ptqrt bench` on a CUDA device: each ptqrt op against its peers, in one process.

    run_gpu_bench(ops=None, quick=False, plot=False, out_dir="bench/results", backends=("triton",), flush="read")
    python -m ptqrt.bench_gpu [--quick] [--plot] [--ops w8a8_gemm,...] [--backends triton,cuda,<variant>]
                              [--flush read|write]

Timings are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed before every run). The
flush reads do_bench's 256 MB buffer (``FLUSH = "read"``, ``--flush read``), which leaves the L2 holding
clean lines; do_bench's own flush writes zeros to it (``--flush write``), which leaves up to an L2's worth
of dirty lines whose write-back to memory is then billed to the timed call: for a call that moves
tens of MB (decode steps, M = 1 GEMMs) that doubles the memory traffic it is timed with. Each run
prints both flushes' times for three peers first (``flush_probe``).
Peers, measured in the same run:
    w8a8_gemm            fp16 F.linear (cuBLAS), torch._int_mm raw, torch._int_mm + unfused dequant
    w8a16_gemm           fp16 F.linear
    quantize_per_*       the eager PyTorch reference
    kv_cache_append      an fp16 paged-cache scatter (index_put)
    int8_kv_decode_att.  fp16 SDPA over a contiguous fp16 KV cache
Each row also carries the floor: max(bytes moved / copy bandwidth, ops / matrix peak), with copy
bandwidth (a large device-to-device copy, bytes read + written), torch._int_mm's int8 peak and the
fp16 matmul peak measured at the start of the same run; frac_floor = floor / time (1.0 = at the
floor). Results go to <out_dir>/gpu_<device>_<time>.json and .csv, tagged with device and versions;
plot=True also draws a roofline-style PNG (matplotlib, imported only then).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import math
import os
import platform
import re
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from .bench import environ

GEMM_NK = ((4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192))
GEMM_M = (1, 16, 32, 128, 512, 2048, 8192)
DECODE_BL = ((1, 4096), (16, 4096), (64, 2048), (8, 32768))
DECODE_HEADS, DECODE_D, DECODE_BLOCK = 32, 128, 16
# GQA rows besides (32 query heads over 8 kv heads, as in Llama 3): (B, L, kv heads); no target.
DECODE_GQA = ((1, 4096, 8), (16, 4096, 8))
QUANT_MK = ((1, 4096), (16, 4096), (2048, 4096), (8192, 8192))
APPEND_T = (16, 4096)
# w8a8_gemm at M = N = K = 8192 too (the CUDA backend's rate target), in full and quick runs alike.
GEMM_SQUARE = ((8192, 8192, 8192),)
QUICK = dict(gemm_nk=((4096, 4096), (28672, 8192)), gemm_m=(1, 16, 2048),
             decode_bl=((1, 4096), (16, 4096), (16, 4096, 8)),
             quant_mk=((8192, 8192),), append_t=(4096,))
ALL_OPS = ("w8a8_gemm", "w8a16_gemm", "int8_kv_decode_attention", "quantize_per_token", "quantize_per_tensor",
           "kv_cache_append")

def _mha(r: dict) -> bool:
    """A decode row without GQA (the targets are stated for 32 heads of 128)."""
    return r.get("HKV", r["H"]) == r["H"]


# The targets on one H100: (op, where, against, at least). "against" is a peer's name (the
# speedup over it), "floor" (the fraction of the bytes/FLOP floor) or "TOP/s" (the achieved rate).
TARGETS = (
    ("w8a8_gemm", lambda r: r["M"] >= 2048, "torch._int_mm", 1.2),
    ("w8a8_gemm", lambda r: r["M"] >= 2048, "fp16 F.linear", 1.5),
    ("w8a8_gemm", lambda r: r["M"] == 512, "torch._int_mm", 1.25),
    ("w8a8_gemm", lambda r: r["M"] <= 16, "fp16 F.linear", 1.8),
    ("w8a16_gemm", lambda r: r["M"] == 1 and (r["N"], r["K"]) in ((28672, 8192), (4096, 4096)), "floor", 0.85),
    ("int8_kv_decode_attention", lambda r: _mha(r) and (r["B"], r["L"]) in ((16, 4096), (8, 32768)), "fp16 SDPA", 1.8),
    ("int8_kv_decode_attention", lambda r: _mha(r) and (r["B"], r["L"]) == (1, 4096), "fp16 SDPA", 2.0),
    ("quantize_per_token", lambda r: (r["M"], r["K"]) == (8192, 8192), "floor", 0.85),
    ("w8a8_gemm", lambda r: (r["M"], r["N"], r["K"]) == (8192, 8192, 8192), "TOP/s", 1300),
)
# The CUDA backend's other target: each op at least as fast as its Triton twin within 5%, every shape.
TWIN_TARGET = ("cuda", "triton", 0.95)


class NoCudaDevice(RuntimeError):
    """A GPU benchmark or tuning run asked for on a machine where no CUDA device is visible (`ptqrt`
    and ``python -m ptqrt.bench_gpu`` report it in one line with status 2, as they do bad arguments)."""


FLUSH = "read"  # how do_bench's L2 flush runs: "read" (its buffer read; clean L2) or "write" (do_bench's own)
FLUSHES = ("read", "write")
_MISSING = object()


class _ReadFlush:
    """do_bench's clear_cache, reading the buffer instead of zeroing it: every line of the L2 is
    replaced by a clean line of the buffer, so the timed call that follows pays no write-back.
    `calls` counts the flushes it ran (all instances): the run's meta says "read" only if do_bench
    really called it."""

    calls = 0

    def __init__(self):
        self.out = None

    def __call__(self, cache: torch.Tensor) -> None:
        if self.out is None or self.out.device != cache.device:
            self.out = torch.empty((), dtype=torch.int64, device=cache.device)
        torch.sum(cache.view(-1), 0, out=self.out)
        _ReadFlush.calls += 1


def _flush_driver():
    """Triton's active driver when do_bench flushes through its clear_cache (Triton 3.x), else None."""
    from triton import runtime

    drv = getattr(getattr(runtime, "driver", None), "active", None)
    return drv if drv is not None and callable(getattr(drv, "clear_cache", None)) else None


@contextlib.contextmanager
def l2_flush(mode: Optional[str] = None):
    """do_bench calls inside the block flush the L2 the `mode` way (default FLUSH): "write" is
    do_bench's own clear_cache (an outer block's swap is undone for the block), "read" swaps the
    active driver's clear_cache for a _ReadFlush. A Triton without that hook keeps its own flush,
    with a message. Process-wide state, like FLUSH: the benchmark runs on one thread."""
    mode = FLUSH if mode is None else mode
    if mode not in FLUSHES:
        raise ValueError(f"ptqrt bench: flush must be one of {FLUSHES}; got {mode!r}")
    drv = _flush_driver()
    if drv is None:
        if mode == "read":
            print("  (this Triton has no driver.active.clear_cache: do_bench flushes the L2 its own way)", flush=True)
        yield "write"
        return
    own = vars(drv).get("clear_cache", _MISSING)
    if mode == "read":
        drv.clear_cache = _ReadFlush()
    elif own is not _MISSING:
        del drv.clear_cache  # the class's own method again
    try:
        yield mode
    finally:
        if own is _MISSING:
            vars(drv).pop("clear_cache", None)
        else:
            drv.clear_cache = own



def _bench(fn: Callable[[], object], rep_ms: int = 40, warmup_ms: int = 10) -> float:
    """Median milliseconds of fn, L2 flushed before each run (do_bench, flushed the FLUSH way), after
    one untimed call that compiles and autotunes."""
    import triton

    fn()
    torch.cuda.synchronize()
    with l2_flush():
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def _bench_graph(fn: Callable[[], object], rep_ms: int = 40) -> float:
    """Median milliseconds of one replay of fn captured in a CUDA graph, L2 flushed before each
    replay: the GPU time without the Python launch path (how servers run decode steps)."""
    import triton

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up and autotuning happen outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    with l2_flush():
        return float(triton.testing.do_bench(graph.replay, warmup=10, rep=rep_ms, return_mode="median"))


GRAPHS = True  # also time every call as a CUDA-graph replay (run_gpu_bench(graphs=False) skips it)


def _try(name: str, fn: Callable[[], object]) -> Optional[tuple]:
    """(eager ms, graph-replay ms or None), or None after printing why it failed: one broken
    implementation must not cost the rest of the run its numbers."""
    try:
        eager = _bench(fn)
    except Exception as e:  # noqa: BLE001 - reported, and the row is left out
        print(f"  {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
        return None
    graph = None
    if GRAPHS and torch.cuda.is_available():
        try:
            graph = _bench_graph(fn)
        except Exception as e:  # noqa: BLE001
            print(f"  {name}: graph capture failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  flush=True)
    return eager, graph


def measure_ceilings(device) -> dict:
    """Copy bandwidth (bytes read + written per second) and int8 / fp16 matrix peaks, on this GPU now."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    copy_ms = _bench(lambda: dst.copy_(src))
    a = torch.randint(-127, 128, (8192, 8192), dtype=torch.int8, device=device)
    b = torch.randint(-127, 128, (8192, 8192), dtype=torch.int8, device=device).t()
    int_ms = _bench(lambda: torch._int_mm(a, b))
    w = torch.randint(-127, 128, (28672, 8192), dtype=torch.int8, device=device)
    int_big_ms = _bench(lambda: torch._int_mm(a, w.t()))
    h = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    hm_ms = _bench(lambda: h @ h.t())
    flops = 2 * 8192 ** 3
    ceil = {"copy_TBps": 2 * n / copy_ms / 1e9, "int_mm_TOPS": flops / int_ms / 1e9,
            "int_mm_TOPS_8192x28672x8192": 2 * 8192 * 28672 * 8192 / int_big_ms / 1e9,
            "fp16_mm_TFLOPS": flops / hm_ms / 1e9}
    # The int8 ceiling of the floor: torch._int_mm reaches less of the int8 tensor cores than cuBLAS's
    # fp16 product reaches of the fp16 ones (a kernel of ours beats it), while the int8 rate is twice
    # the fp16 rate on every tensor-core generation since sm_75. So: the larger of the two.
    ceil["int8_peak_TOPS"] = max(ceil["int_mm_TOPS"], 2 * ceil["fp16_mm_TFLOPS"])
    return ceil


# The flush probe's peers: fp16 F.linear at M = 1 on these (N, K), fp16 SDPA at B = 1 over this length.
PROBE_NK = ((4096, 4096), (28672, 8192))
PROBE_L = 4096


def flush_probe(device) -> dict:
    """Three peers timed after each flush: {name: {"read": ms, "write": ms}} (printed as well). The
    read flush's times are the ones the targets use; the write flush is how do_bench times them."""
    cases = {}
    for n, k in PROBE_NK:
        x, w = (torch.randn(1, k, device=device, dtype=torch.float16),
                torch.randn(n, k, device=device, dtype=torch.float16))
        cases[f"fp16 F.linear M=1 {n}x{k}"] = lambda x=x, w=w: F.linear(x, w)
    q = torch.randn(1, DECODE_HEADS, 1, DECODE_D, device=device, dtype=torch.float16)
    k = torch.randn(1, DECODE_HEADS, PROBE_L, DECODE_D, device=device, dtype=torch.float16)
    v = torch.randn_like(k)
    cases[f"fp16 SDPA B=1 L={PROBE_L}"] = lambda: F.scaled_dot_product_attention(q, k, v)
    out = {}
    print("L2 flush probe (us; read flush | write flush):", flush=True)
    for name, fn in cases.items():
        got = {}
        for mode in FLUSHES:
            with _flush_as(mode):
                got[mode] = _bench(fn, rep_ms=20)
        out[name] = got
        print(f"  {name:32s} {1e3 * got['read']:9.1f} | {1e3 * got['write']:9.1f}", flush=True)
    return out


@contextlib.contextmanager
def _flush_as(mode: str):
    global FLUSH
    old, FLUSH = FLUSH, mode
    try:
        yield
    finally:
        FLUSH = old


# Kernel variants, benchmarked beside the default kernels of their backend: opt-in ones before they
# become the default, and the kernels a new default replaced, to confirm it. name -> (backend, the ops
# it changes, the environment that selects it, the M range (lo, hi) of the GEMM rows where it is
# timed: where it differs from the default; hi None = no bound). (The ones before these were measured
# on an H100 and became the default or were removed: bench/NOTES.md, "Version 3 measured".)
VARIANTS = {
    # the tensor-core CUDA decode (opt-in: fp16 / bf16 queries, D 64 or 128, dynamic scales)
    "cuda-decode-mma": ("cuda", ("int8_kv_decode_attention",), {"PTQRT_CUDA_DECODE_MMA": "1"}, (0, None)),
    # the CUDA quantizers (and the token append kernel) multiplying by 1 / s, dividing near half-integers
    "cuda-quant-recip": ("cuda", ("quantize_per_token", "quantize_per_tensor", "kv_cache_append"),
                         {"PTQRT_CUDA_QUANT_RECIPROCAL": "1"}, (0, None)),
    # the sm_90a w8a16 GEMM's split-K capped at one wave of CTAs (17-512 rows: 11008 x 4096 at 32 and 128)
    "cuda-w8a16-wave": ("cuda", ("w8a16_gemm",), {"PTQRT_CUDA_W8A16_WAVE_CAP": "1"}, (17, 512)),
    # kv_cache_append's kernel before the token kernel (a CTA a token): a warp a row
    "cuda-append-row": ("cuda", ("kv_cache_append",), {"PTQRT_CUDA_APPEND_KERNEL": "row"}, (0, None)),
    # the sm_90a w8a8 GEMM's rules before version 3: one CTA a tile, 256-wide unless that left SMs idle
    # (from 65 rows; 17-64 rows with a wave of 128-wide tiles, on sm_90a since then, have no switch back)
    "cuda-old-tiles": ("cuda", ("w8a8_gemm",), {"PTQRT_CUDA_TILE_WAVES": "0", "PTQRT_CUDA_SM90_PERSISTENT": "0"},
                       (65, None)),
    # the Triton w8a8 pointer kernel where the TMA kernel is now the default (sm_90, M >= 2048)
    "triton-pointer": ("triton", ("w8a8_gemm",), {"PTQRT_TRITON_TMA": "0"}, (2048, None)),
}


def _differs(impl: str, m: int) -> bool:
    """False for a variant at an M outside its range (nothing to time, or not worth the device time)."""
    if impl not in VARIANTS:
        return True
    lo, hi = VARIANTS[impl][3]
    return m >= lo and (hi is None or m <= hi)


def _with_env(fn: Callable, env: dict) -> Callable:
    """fn called with `env` set (the CUDA host code reads these switches on every call)."""
    def call(*args, **kwargs):
        with environ(env):
            return fn(*args, **kwargs)
    return call


def _impls(backends: Iterable[str], device) -> dict:
    """{backend: {op: callable}} for the backends (or VARIANTS) that load on this device."""
    from . import ops

    found = {}
    for name in backends:
        base, only, env, _ = VARIANTS.get(name, (name, None, {}, 0))
        impls = ops._provider(base, device)
        if impls and only is not None:
            impls = {op: _with_env(f, env) for op, f in impls.items() if op in only}
        if impls:
            found[name] = impls
        else:
            print(f"ptqrt bench: backend {name!r} is unavailable on {device}; skipped")
    return found


def _floor_ms(bytes_moved: float, ops_count: float, peak_tops: float, ceil: dict) -> float:
    t_mem = bytes_moved / (ceil["copy_TBps"] * 1e9)
    t_ops = ops_count / (peak_tops * 1e9) if ops_count else 0.0
    return max(t_mem, t_ops)


# Each variant's output against its default's, per shape (what a timing alone would not show):
# bit for bit, except where the variant adds in another order (then within REL_TOL of the largest value,
# by op or by (variant, op): fp16 outputs summed in another order, the decode's splits, w8a16's split-K
# count, differ by a few ulps).
REL_TOL = {"int8_kv_decode_attention": 1e-2, ("cuda-w8a16-wave", "w8a16_gemm"): 1e-2}
_MISMATCHES: list = []


def _check_variants(op: str, shape: dict, impls: dict, call: Callable) -> None:
    """call(fn) -> the tensors fn's call produces (for an in-place op, the ones it writes, on copies);
    a variant that fails, or whose tensors differ from its default's, is recorded in _MISMATCHES."""
    for name, (base, ops_changed, _, _) in VARIANTS.items():
        if op not in ops_changed or name not in impls or op not in impls.get(base, {}):
            continue
        m = shape.get("M")
        if m is not None and not _differs(name, m):
            continue
        why = None
        try:
            mine, theirs = call(impls[name][op]), call(impls[base][op])
            for a, b in zip(mine, theirs):
                if torch.equal(a, b):
                    continue
                tol = REL_TOL.get((name, op), REL_TOL.get(op))
                big = max(1.0, float(b.float().abs().max()))
                diff = float((a.float() - b.float()).abs().max())
                if tol is None or not diff <= tol * big:
                    why = f"max |difference| {diff:.3g} (largest value {big:.3g})"
                    break
        except Exception as e:  # noqa: BLE001 -- reported, like a failed timing
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if why is not None:
            _MISMATCHES.append(dict(variant=name, base=base, op=op, shape=_shape_str(shape), why=why))
            print(f"  MISMATCH {name} vs {base} {op} {_shape_str(shape)}: {why}", flush=True)


def _rows_for(op, shape: dict, ours: dict, peers: dict, floor_ms: float, bytes_moved: float, ops_count: float) -> list:
    """One row per implementation (values: _try's (eager ms, graph ms)); our rows carry
    speedup_vs_<peer> = peer time / our time, eagerly launched, and graph_speedup_vs_<peer> as
    CUDA-graph replays, with graph_us and graph_frac_floor."""
    rows = []
    for kind, table in (("ours", ours), ("peer", peers)):
        for impl, t in table.items():
            if t is None:
                continue
            ms, gms = t
            row = dict(op=op, impl=impl, kind=kind, **shape, us=ms * 1e3, floor_us=floor_ms * 1e3,
                       frac_floor=floor_ms / ms, GBps=bytes_moved / ms / 1e6, TOPS=ops_count / ms / 1e9)
            if gms is not None:
                row.update(graph_us=gms * 1e3, graph_frac_floor=floor_ms / gms)
            if kind == "ours":
                for p, pt in peers.items():
                    if pt is not None:
                        row[f"speedup_vs_{p}"] = pt[0] / ms
                        if gms is not None and pt[1] is not None:
                            row[f"graph_speedup_vs_{p}"] = pt[1] / gms
            rows.append(row)
    _print_ours(rows)
    return rows


# ------------------------------------------------------------------------------------------ per op
def _weights(n: int, k: int, device) -> tuple:
    """(w_q int8 [N, K], w_scale [N], the fp16 weight the peers multiply by) for one GEMM shape."""
    return (torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device),
            torch.rand(n, device=device) * 0.01 + 1e-3, torch.randn(n, k, device=device, dtype=torch.float16))


def bench_w8a8_gemm(impls, ceil, nk_list, m_list, device):
    rows = []
    for n, k in nk_list:
        w_q, w_scale, w16 = _weights(n, k, device)
        for m in m_list:
            x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
            x_scale = torch.rand(m, device=device) * 0.01 + 1e-3
            x16 = torch.randn(m, k, device=device, dtype=torch.float16)
            ours = {b: _try(b, lambda f=f["w8a8_gemm"]: f(x_q, x_scale, w_q, w_scale, None, torch.float16))
                    for b, f in impls.items() if "w8a8_gemm" in f and _differs(b, m)}
            _check_variants("w8a8_gemm", dict(M=m, N=n, K=k), impls,
                            lambda f: (f(x_q, x_scale, w_q, w_scale, None, torch.float16),))
            peers = {"fp16 F.linear": _try("fp16 F.linear", lambda: F.linear(x16, w16))}
            if m > 16:  # torch._int_mm refuses M <= 16
                peers["torch._int_mm"] = _try("torch._int_mm", lambda: torch._int_mm(x_q, w_q.t()))
                peers["_int_mm+dequant"] = _try("_int_mm+dequant", lambda: (
                    torch._int_mm(x_q, w_q.t()).float() * x_scale[:, None] * w_scale[None, :]).half())
            nbytes = m * k + n * k + 2 * m * n + 4 * (m + n)
            nops = 2 * m * n * k
            floor = _floor_ms(nbytes, nops, ceil.get("int8_peak_TOPS", ceil["int_mm_TOPS"]), ceil)
            rows += _rows_for("w8a8_gemm", dict(M=m, N=n, K=k), ours, peers, floor, nbytes, nops)
    return rows


def bench_w8a16_gemm(impls, ceil, nk_list, m_list, device):
    rows = []
    for n, k in nk_list:
        w_q, w_scale, w16 = _weights(n, k, device)
        for m in m_list:
            x16 = torch.randn(m, k, device=device, dtype=torch.float16)
            ours = {b: _try(b, lambda f=f["w8a16_gemm"]: f(x16, w_q, w_scale, None, 0))
                    for b, f in impls.items() if "w8a16_gemm" in f and _differs(b, m)}
            _check_variants("w8a16_gemm", dict(M=m, N=n, K=k), impls, lambda f: (f(x16, w_q, w_scale, None, 0),))
            peers = {"fp16 F.linear": _try("fp16 F.linear", lambda: F.linear(x16, w16))}
            nbytes = n * k + 2 * m * k + 2 * m * n + 4 * n
            nops = 2 * m * n * k
            floor = _floor_ms(nbytes, nops, ceil["fp16_mm_TFLOPS"], ceil)
            rows += _rows_for("w8a16_gemm", dict(M=m, N=n, K=k), ours, peers, floor, nbytes, nops)
    return rows


def bench_quantize(op, impls, ceil, mk_list, device):
    from . import reference as ref

    rows = []
    for m, k in mk_list:
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        scale = torch.tensor([0.02], device=device)
        args = (x, None) if op == "quantize_per_token" else (x, scale, None)
        ours = {b: _try(b, lambda f=f[op]: f(*args)) for b, f in impls.items() if op in f}
        _check_variants(op, dict(M=m, K=k), impls, lambda f: tuple(f(*args)) if op == "quantize_per_token"
                        else (f(*args),))
        peers = {"torch eager": _try("torch eager", lambda: getattr(ref, op)(*args))}
        nbytes = 3 * m * k + (4 * m if op == "quantize_per_token" else 0)
        floor = _floor_ms(nbytes, 0, 1.0, ceil)
        rows += _rows_for(op, dict(M=m, K=k), ours, peers, floor, nbytes, 0)
    return rows


def bench_kv_cache_append(impls, ceil, t_list, device):
    rows = []
    h, d, bs = DECODE_HEADS, DECODE_D, DECODE_BLOCK
    for t in t_list:
        nb = 2 * t // bs + 8
        kc = torch.zeros(nb, bs, h, d, dtype=torch.int8, device=device)
        vc = torch.zeros_like(kc)
        ks = torch.ones(nb, bs, h, device=device)
        vs = torch.ones_like(ks)
        k = torch.randn(t, h, d, device=device, dtype=torch.float16)
        v = torch.randn_like(k)
        slots = torch.randperm(nb * bs, device=device)[:t]
        ours = {b: _try(b, lambda f=f["kv_cache_append"]: f(k, v, kc, vc, ks, vs, slots))
                for b, f in impls.items() if "kv_cache_append" in f}

        def written(f):  # the caches and scales an append writes, from copies
            state = [c.clone() for c in (kc, vc, ks, vs)]
            f(k, v, *state, slots)
            return tuple(state)

        _check_variants("kv_cache_append", dict(T=t), impls, written)
        kc16 = torch.zeros(nb * bs, h, d, dtype=torch.float16, device=device)
        vc16 = torch.zeros_like(kc16)

        def fp16_scatter():
            kc16[slots] = k
            vc16[slots] = v

        peers = {"fp16 cache scatter": _try("fp16 cache scatter", fp16_scatter)}
        nbytes = 2 * t * h * d * 2 + 2 * t * h * d + 2 * t * h * 4 + 8 * t
        floor = _floor_ms(nbytes, 0, 1.0, ceil)
        rows += _rows_for("kv_cache_append", dict(T=t, H=h, D=d), ours, peers, floor, nbytes, 0)
    return rows


def bench_decode(impls, ceil, bl_list, device):
    rows = []
    hq, d, bs = DECODE_HEADS, DECODE_D, DECODE_BLOCK
    for shape in bl_list:
        b, length = shape[:2]
        h = shape[2] if len(shape) > 2 else hq  # kv heads
        blocks_per_seq = length // bs
        nb = b * blocks_per_seq
        kc = torch.randint(-127, 128, (nb, bs, h, d), dtype=torch.int8, device=device)
        vc = torch.randint(-127, 128, (nb, bs, h, d), dtype=torch.int8, device=device)
        ks = torch.rand(nb, bs, h, device=device) * 0.02 + 1e-3
        vs = torch.rand(nb, bs, h, device=device) * 0.02 + 1e-3
        # Paged as a server would leave it: each sequence's blocks scattered over the pool.
        block_table = torch.randperm(nb, device=device, dtype=torch.int64).to(torch.int32).reshape(b, blocks_per_seq)
        seq_lens = torch.full((b,), length, dtype=torch.int32, device=device)
        q = torch.randn(b, hq, d, device=device, dtype=torch.float16)
        sm_scale = 1.0 / math.sqrt(d)
        args = (q, kc, vc, ks, vs, block_table, seq_lens, sm_scale)
        _check_variants("int8_kv_decode_attention", dict(B=b, L=length, HKV=h), impls, lambda f: (f(*args),))
        ours = {be: _try(be, lambda f=f["int8_kv_decode_attention"]: f(*args))
                for be, f in impls.items() if "int8_kv_decode_attention" in f}
        k16 = torch.randn(b, h, length, d, device=device, dtype=torch.float16)
        v16 = torch.randn_like(k16)
        q4 = q[:, :, None, :]
        gqa = dict(enable_gqa=True) if h != hq else {}
        peers = {"fp16 SDPA": _try("fp16 SDPA", lambda: F.scaled_dot_product_attention(q4, k16, v16,
                                                                               scale=sm_scale, **gqa))}
        nbytes = 2 * b * length * h * d + 2 * b * length * h * 4 + 4 * b * hq * d + 4 * b * (1 + blocks_per_seq)
        floor = _floor_ms(nbytes, 0, 1.0, ceil)
        rows += _rows_for("int8_kv_decode_attention", dict(B=b, L=length, H=hq, HKV=h, D=d), ours, peers, floor,
                          nbytes, 4 * b * hq * length * d)
    return rows


# ------------------------------------------------------------------------------------------ report
def check_targets(rows: list, mode: str = "eager") -> list:
    """[{target, impl, mode, measured, ok}] per target and backend with measured rows (worst of its
    shapes); mode "eager" (do_bench of the Python call) or "graph" (CUDA-graph replays)."""
    pre = "" if mode == "eager" else "graph_"
    out = []
    for op, where, against, at_least in TARGETS:
        for impl in dict.fromkeys(r["impl"] for r in rows if r["kind"] == "ours"):
            got = [_target_value(r, against, pre)
                   for r in rows if r["op"] == op and r["impl"] == impl and r["kind"] == "ours" and where(r)]
            got = [g for g in got if g is not None]
            if got:
                what = {"floor": "of the floor", "TOP/s": "TOP/s"}.get(against, f"x {against}")
                out.append(dict(target=f"{op}: >= {at_least:g} {what}", impl=impl, mode=mode, measured=min(got),
                                ok=min(got) >= at_least))
    return out


def _target_value(r: dict, against: str, pre: str):
    if against == "floor":
        return r.get(f"{pre}frac_floor")
    if against == "TOP/s":
        return r["TOPS"] if not pre else (r["TOPS"] * r["us"] / r["graph_us"] if "graph_us" in r else None)
    return r.get(f"{pre}speedup_vs_{against}")


def check_twins(rows: list, mode: str = "eager") -> list:
    """The CUDA backend against its Triton twin: per op, [dict(target, impl, mode, measured, ok,
    worst_shape)] with measured = min over the shapes both ran of triton time / cuda time."""
    ours, base, at_least = TWIN_TARGET
    key = "us" if mode == "eager" else "graph_us"
    out = []
    mine = [r for r in rows if r.get("kind") == "ours"]
    for op in dict.fromkeys(r["op"] for r in mine):
        pairs = []
        for r in mine:
            if r["op"] != op or r["impl"] != ours or key not in r:
                continue
            t = next((x for x in mine if x["op"] == op and x["impl"] == base and _shape_str(x) == _shape_str(r)), None)
            if t is not None and key in t:
                pairs.append((t[key] / r[key], _shape_str(r)))
        if pairs:
            worst = min(pairs)
            out.append(dict(target=f"{op}: {ours} >= {at_least:g}x {base} at every shape", impl=ours, mode=mode,
                            measured=worst[0], ok=worst[0] >= at_least, worst_shape=worst[1]))
    return out


def _shape_str(r: dict) -> str:
    keys = [k for k in ("M", "N", "K", "B", "L", "HKV", "T") if k in r]
    return " ".join(f"{k}={r[k]}" for k in keys)


def print_header(ceil: dict, meta: dict) -> None:
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  L2 flush: {meta.get('flush', '?')}")
    print(f"copy {ceil['copy_TBps']:.2f} TB/s   torch._int_mm {ceil['int_mm_TOPS']:.0f} TOP/s (8192^3), "
          f"{ceil['int_mm_TOPS_8192x28672x8192']:.0f} (8192x28672x8192)   fp16 mm {ceil['fp16_mm_TFLOPS']:.0f} TFLOP/s"
          f"   int8 ceiling for the floors {ceil.get('int8_peak_TOPS', ceil['int_mm_TOPS']):.0f} TOP/s")


def _print_ours(rows: list) -> None:
    """Our rows of one shape, as soon as they are measured: time, floor, fraction of the floor,
    speedup over each peer."""
    for r in rows:
        if r["kind"] != "ours":
            continue
        peers = " ".join(f"{k[len('speedup_vs_'):]}={v:.2f}x" for k, v in r.items() if k.startswith("speedup_vs_"))
        graph = ""
        if "graph_us" in r:
            gp = " ".join(f"{v:.2f}x" for k, v in r.items() if k.startswith("graph_speedup_vs_"))
            graph = f" | graph {r['graph_us']:8.1f} us ({100 * r['graph_frac_floor']:5.1f}%) {gp}"
        print(f"  {r['op'][:10]:10s} {_shape_str(r):24s} {r['impl']:12s} {r['us']:9.1f} us  floor {r['floor_us']:8.1f} us "
              f"({100 * r['frac_floor']:5.1f}%)  {peers}{graph}", flush=True)


def print_rows(rows: list) -> None:
    """Our rows per op: time, floor, fraction of the floor, speedup over each peer."""
    for op in dict.fromkeys(r["op"] for r in rows):
        print(f"\n{op}")
        _print_ours([r for r in rows if r["op"] == op])


def print_targets(rows: list) -> None:
    eager = check_targets(rows, "eager") + check_twins(rows, "eager")
    graph = {(t["target"], t["impl"]): t for t in check_targets(rows, "graph") + check_twins(rows, "graph")}
    if eager or _MISMATCHES:
        print("\ntargets (worst shape)                                                  eager launch | CUDA graph")
        for mm in _MISMATCHES:  # a variant that computes something else is no candidate at any speed
            print(f"  FAIL  {mm['variant']:12s} {mm['op']}: output differs from {mm['base']} at {mm['shape']}: "
                  f"{mm['why']}")
        for t in eager:
            g = graph.get((t["target"], t["impl"]))
            gs = f"{'PASS' if g['ok'] else 'MISS'} {g['measured']:.2f}" if g else "-"
            worst = f"  (worst: {t['worst_shape']})" if "worst_shape" in t else ""
            print(f"  {'PASS' if t['ok'] else 'MISS'}  {t['impl']:12s} {t['target']:55s} {t['measured']:5.2f} | {gs}{worst}")


def compare_variants(rows: list) -> list:
    """For each variant (VARIANTS) and op: default time / variant time over the shapes where
    both ran, eager and CUDA-graph: [dict(variant, op, base, n, eager_min, eager_geo, eager_max,
    graph_min, graph_geo, graph_max, worst_shape)] (> 1: the variant is faster)."""
    out = []
    ours = [r for r in rows if r.get("kind") == "ours"]
    for name, (base, ops_changed, _, _) in VARIANTS.items():
        for op in ops_changed:
            pairs = []
            for r in ours:
                if r["impl"] != name or r["op"] != op:
                    continue
                key = _shape_str(r)
                d = next((x for x in ours if x["impl"] == base and x["op"] == op and _shape_str(x) == key), None)
                if d is not None:
                    pairs.append((key, d["us"] / r["us"],
                                  d["graph_us"] / r["graph_us"] if "graph_us" in d and "graph_us" in r else None))
            if not pairs:
                continue
            row = dict(variant=name, op=op, base=base, n=len(pairs), worst_shape=min(pairs, key=lambda p: p[1])[0])
            for mode, i in (("eager", 1), ("graph", 2)):
                vals = [p[i] for p in pairs if p[i] is not None]
                if vals:
                    row.update({f"{mode}_min": min(vals), f"{mode}_max": max(vals),
                                f"{mode}_geo": math.exp(sum(math.log(v) for v in vals) / len(vals))})
            out.append(row)
    return out


def print_variants(rows: list) -> None:
    cmp = compare_variants(rows)
    if not cmp:
        return
    print("\nvariants: default time / variant time (> 1: the variant is faster), min / geomean / max over shapes")
    for c in cmp:
        g = (f"{c['graph_min']:.2f} / {c['graph_geo']:.2f} / {c['graph_max']:.2f}" if "graph_geo" in c else "-")
        print(f"  {c['variant']:15s} vs {c['base']:7s} {c['op']:26s} n={c['n']:2d}  eager "
              f"{c['eager_min']:.2f} / {c['eager_geo']:.2f} / {c['eager_max']:.2f}   graph {g}   (worst: {c['worst_shape']})")


def print_table(rows: list, ceil: dict, meta: dict) -> None:
    print_header(ceil, meta)
    print_rows(rows)
    print_targets(rows)
    print_variants(rows)


def write_results(rows: list, ceil: dict, meta: dict, out_dir) -> tuple:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", meta["device"]).strip("_")
    stem = out / f"gpu_{slug}_{meta['time'].replace(':', '').replace('-', '')}"
    payload = dict(meta, ceilings=ceil, targets=check_targets(rows) + check_targets(rows, "graph")
                   + check_twins(rows) + check_twins(rows, "graph"),
                   variants=compare_variants(rows), variant_mismatches=list(_MISMATCHES), rows=rows)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "torch", "triton", *keys])
        w.writeheader()
        for r in rows:
            w.writerow(dict(device=meta["device"], torch=meta["torch"], triton=meta["triton"], **r))
    return stem.with_suffix(".json"), stem.with_suffix(".csv")


def plot_results(rows: list, ceil: dict, meta: dict, path) -> Path:
    """Roofline (achieved op rate against bytes-per-op intensity, with the measured ceilings) and
    the speedup of ours over the first peer of each shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6))
    peak = ceil.get("int8_peak_TOPS", ceil["int_mm_TOPS"])
    xs = [2 ** e for e in range(-4, 14)]
    ax1.plot(xs, [min(peak, ceil["copy_TBps"] * x) for x in xs], "k-", lw=1, label="int8 roof (measured)")
    ax1.plot(xs, [min(ceil["fp16_mm_TFLOPS"], ceil["copy_TBps"] * x) for x in xs], "k--", lw=1, label="fp16 roof")
    for (op, kind), marker in zip(sorted({(r["op"], r["kind"]) for r in rows}), "o^sv<>Dpx+*h"):
        pts = [(r["TOPS"] / r["GBps"] * 1e3, r["TOPS"]) for r in rows
               if r["op"] == op and r["kind"] == kind and r["TOPS"] > 0]
        if pts:
            ax1.scatter(*zip(*pts), marker=marker, label=f"{op} ({kind})", alpha=0.7)
    ax1.set(xscale="log", yscale="log", xlabel="ops per byte", ylabel="TOP/s (TFLOP/s)",
            title=f"roofline, {meta['device']}")
    ax1.legend(fontsize=7)
    mine = [r for r in rows if r["kind"] == "ours"]
    labels, values = [], []
    for r in mine:
        sp = [v for k, v in r.items() if k.startswith("speedup_vs_")]
        if sp:
            labels.append(f"{r['op'][:12]} {_shape_str(r)}")
            values.append(sp[0])
    ax2.barh(range(len(values)), values)
    ax2.axvline(1.0, color="k", lw=1)
    ax2.set_yticks(range(len(values)), labels, fontsize=6)
    ax2.set(xlabel="speedup over the first peer (fp16 F.linear / eager / scatter / SDPA)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_gpu_bench(ops: Optional[Iterable[str]] = None, quick: bool = False, plot: bool = False,
                  out_dir="bench/results", backends=("triton",), flush: str = "read") -> list[dict]:
    """Benchmark `ops` (default: all) of each backend against the peers on the current CUDA device;
    print a table, write JSON/CSV (and a PNG with plot=True) to out_dir, return the rows. `flush`:
    how the L2 is flushed before each timed call (FLUSHES; module docstring). Bad arguments raise
    ValueError, a machine without a CUDA device NoCudaDevice, before anything is measured."""
    ops = check_args(ops, backends, flush)
    if not torch.cuda.is_available():
        raise NoCudaDevice("the GPU benchmarks need a CUDA device, and none is visible (`ptqrt bench --cpu` "
                           "times the CPU backend)")
    with _flush_as(flush):
        return _run(ops, quick, plot, out_dir, backends)


def check_args(ops: Optional[Iterable[str]], backends: Iterable[str], flush: str) -> tuple:
    """The ops to run (all for None or empty); ValueError for an unknown op, backend or flush, before
    anything is measured."""
    from . import ops as _ops

    if flush not in FLUSHES:
        raise ValueError(f"flush must be one of {FLUSHES}; got {flush!r}")
    ops = tuple(ops) if ops else ALL_OPS
    unknown = set(ops) - set(ALL_OPS)
    if unknown:
        raise ValueError(f"unknown ops {sorted(unknown)}; choose from {', '.join(ALL_OPS)}")
    known = _ops.BACKENDS + tuple(VARIANTS)
    unknown = [b for b in backends if b not in known]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; choose from {', '.join(known)}")
    return ops


def _run(ops, quick, plot, out_dir, backends) -> list[dict]:
    import triton

    device = torch.device("cuda", torch.cuda.current_device())
    shapes = QUICK if quick else dict(gemm_nk=GEMM_NK, gemm_m=GEMM_M, decode_bl=DECODE_BL + DECODE_GQA, quant_mk=QUANT_MK,
                                      append_t=APPEND_T)
    meta = dict(device=torch.cuda.get_device_name(device), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(), quick=quick, backends=list(backends),
                sms=torch.cuda.get_device_properties(device).multi_processor_count,
                time=_dt.datetime.now().strftime("%Y-%m-%dT%H:%M:%S"))
    calls = _ReadFlush.calls
    try:  # a diagnosis: its failure must not cost the run (and it runs before the seed of the inputs)
        with torch.no_grad():
            meta["flush_probe"] = flush_probe(device)
    except Exception as e:  # noqa: BLE001
        meta["flush_probe"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"  L2 flush probe {meta['flush_probe']}", flush=True)
    torch.manual_seed(0)
    ceil = measure_ceilings(device)
    # "read" only where do_bench was seen calling the swapped-in flush (a Triton that flushes some other
    # way keeps its own, whatever was asked).
    meta["flush"] = FLUSH if FLUSH == "write" or _ReadFlush.calls > calls else "write (do_bench's own)"
    print_header(ceil, meta)
    impls = _impls(backends, device)
    rows = []
    _MISMATCHES.clear()
    with torch.no_grad():
        for op in ops:  # each row is printed as soon as it is measured, the files rewritten after each op
            print(f"\n{op}", flush=True)
            if op == "w8a8_gemm":
                got = bench_w8a8_gemm(impls, ceil, shapes["gemm_nk"], shapes["gemm_m"], device)
                for m, n, k in GEMM_SQUARE:
                    got += bench_w8a8_gemm(impls, ceil, ((n, k),), (m,), device)
            elif op == "w8a16_gemm":
                got = bench_w8a16_gemm(impls, ceil, shapes["gemm_nk"], shapes["gemm_m"], device)
            elif op in ("quantize_per_token", "quantize_per_tensor"):
                got = bench_quantize(op, impls, ceil, shapes["quant_mk"], device)
            elif op == "kv_cache_append":
                got = bench_kv_cache_append(impls, ceil, shapes["append_t"], device)
            else:
                got = bench_decode(impls, ceil, shapes["decode_bl"], device)
            rows += got
            write_results(rows, ceil, meta, out_dir)
            torch.cuda.empty_cache()
    print_targets(rows)
    print_variants(rows)
    json_path, csv_path = write_results(rows, ceil, meta, out_dir)
    print(f"\nwrote {json_path} and {csv_path}")
    if plot:
        print(f"wrote {plot_results(rows, ceil, meta, json_path.with_suffix('.png'))}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ptqrt.bench_gpu", description="ptqrt GPU kernel benchmarks")
    ap.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    ap.add_argument("--quick", action="store_true", help="a subset that runs in about a minute")
    ap.add_argument("--plot", action="store_true", help="also draw a PNG (needs matplotlib)")
    ap.add_argument("--out-dir", default="bench/results")
    ap.add_argument("--backends", default="triton",
                    help="comma-separated: triton, cuda, or a variant ("
                         f"{', '.join(VARIANTS) or 'none at present'})")
    ap.add_argument("--flush", choices=FLUSHES, default="read",
                    help="L2 flush before each timed call: read a 256 MB buffer (default; the L2 is left "
                         "clean) or write it (do_bench's own; its write-back is billed to the call)")
    a = ap.parse_args(argv)
    ops = [o for o in a.ops.split(",") if o] or None
    backends = tuple(b for b in a.backends.split(",") if b)
    try:  # bad arguments and a missing GPU (run_gpu_bench checks both first): one line and status 2
        run_gpu_bench(ops, a.quick, a.plot, a.out_dir, backends, a.flush)
    except (ValueError, NoCudaDevice) as e:
        if os.environ.get("PTQRT_DEBUG") == "1":  # the whole traceback, as `ptqrt` gives it
            raise
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
