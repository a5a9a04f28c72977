"""Tune the `auto` dispatch table on this GPU: time every backend of every op per M-bucket and keep the
fastest.

    tune(ops=None, quick=False, mode="eager") -> Path   measure, write the table, make ptqrt.ops use it now
    decide(timings, default="triton", tie=0.0) -> {op: {str(bucket): backend}}     the pure decision
    write(timings, device_name) -> Path      decide + dispatch_table.write_table + reset
    op_names(ops) -> list                    the ops to time (None: all); empty or unknown refused

Two ways to time, at one representative shape per op and bucket (mode=...):
  "eager" (default)  milliseconds per call of back-to-back eager calls, host launch cost included
                     where it exceeds the kernel's time -- how a model runs its layers without CUDA
                     graphs; the inputs rotate over enough copies to exceed twice the L2 cache, so
                     weights come from HBM as in a model's sequence of layers.
  "kernel"           medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed before each
                     run): the kernels alone, as under CUDA-graph replay.
The shapes: M = the bucket's bound (8192 for the last, open one), N = K =
4096 for the GEMMs (2048 with quick=True), 32 query / 8 kv heads of 128 for attention over 1024-token
sequences. The backends timed are those that load here among "triton" and "cuda"; "reference" only
when neither does. A backend that fails at a shape simply does not win that bucket. The table goes to
``dispatch_table.table_path(torch.cuda.get_device_name())`` in the format ``ptqrt.ops._auto_chain``
reads, ``{op: {str(bucket): backend}}``, together with the raw timings.
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import torch

from . import dispatch_table
from . import ops as _ops

CANDIDATES = ("triton", "cuda")
LAST_BUCKET_M = 8192
MODES = ("eager", "kernel")
MAX_COPIES = 16


def decide(timings: Mapping[str, Mapping[int, Mapping[str, Optional[float]]]], default: str = "triton",
           tie: float = 0.0) -> dict:
    """{op: {str(bucket): backend}} from {op: {bucket: {backend: milliseconds or None}}}.

    Per bucket the fastest finite timing wins; "reference" counts only when no other backend has a
    timing. `default` keeps a bucket when it is within `tie` (a fraction) of the fastest, and takes
    any bucket where nothing could be timed."""
    table: dict = {}
    for op, per_bucket in timings.items():
        row = {}
        for b, per_backend in per_bucket.items():
            ok = {name: float(t) for name, t in per_backend.items()
                  if t is not None and math.isfinite(float(t)) and float(t) > 0}
            if any(name != "reference" for name in ok):
                ok.pop("reference", None)
            if not ok:
                row[str(b)] = default
                continue
            best = min(ok, key=ok.get)
            if default in ok and ok[default] <= ok[best] * (1.0 + tie):
                best = default
            row[str(b)] = best
        table[op] = row
    return table


def write(timings: Mapping, device_name: str, default: str = "triton", tie: float = 0.0,
          extra: Optional[dict] = None) -> Path:
    """Decide, merge over the table in use for the ops not timed, write it for `device_name`, and make
    ptqrt.ops read it from now on. A damaged table tuned here before is replaced, with a warning."""
    table = decide(timings, default=default, tie=tie)
    current = _table_in_use(device_name)
    merged = {**{op: dict(row) for op, row in current.items()}, **table}
    raw = {op: {str(b): dict(v) for b, v in per.items()} for op, per in timings.items()}
    path = dispatch_table.write_table(device_name, merged, extra={"timings_ms": raw, **(extra or {})})
    _ops.reset_dispatch_table()
    return path


def _table_in_use(device_name: str) -> dict:
    """The rows `write` keeps for the ops it did not time: the table in use on this GPU, {} on another.
    A table tuned here that cannot be read, or is not for this GPU, is replaced (with a warning) rather
    than losing the timings just taken: the shipped table's rows stand in for it."""
    if dispatch_table.current_gpu_name() != device_name:
        return {}
    return dispatch_table.load_table(replacing=True)


# ----------------------------------------------------------------------------- measuring
def bucket_ms(quick: bool) -> dict:
    """{bucket: the M timed for it}."""
    return {b: (b if b <= 4096 else (4096 if quick else LAST_BUCKET_M)) for b in _ops.M_BUCKETS}


def make_inputs(op: str, m: int, device, quick: bool) -> tuple:
    """Positional arguments of `op` at the representative shape for M = m."""
    nk = 2048 if quick else 4096
    r8 = lambda *s: torch.randint(-127, 128, s, dtype=torch.int8, device=device)  # noqa: E731
    scale = lambda *s: torch.rand(*s, device=device) * 0.01 + 1e-3  # noqa: E731
    if op == "quantize_per_token":
        return (torch.randn(m, nk, device=device, dtype=torch.float16), None)
    if op == "quantize_per_tensor":
        return (torch.randn(m, nk, device=device, dtype=torch.float16), torch.tensor([0.02], device=device), None)
    if op == "w8a8_gemm":
        return (r8(m, nk), scale(m), r8(nk, nk), scale(nk), None, torch.float16)
    if op == "w8a16_gemm":
        return (torch.randn(m, nk, device=device, dtype=torch.float16), r8(nk, nk), scale(nk), None, 0)
    heads, kv_heads, d, block = 32, 8, 128, 16
    if op == "kv_cache_append":
        nb = m // block + 1
        cache = lambda: r8(nb, block, kv_heads, d)  # noqa: E731
        return (torch.randn(m, kv_heads, d, device=device, dtype=torch.float16),
                torch.randn(m, kv_heads, d, device=device, dtype=torch.float16), cache(), cache(),
                scale(nb, block, kv_heads), scale(nb, block, kv_heads),
                torch.arange(m, device=device, dtype=torch.int64))
    if op == "int8_kv_decode_attention":
        b = min(m, 256)  # M is the batch here; cap the cache at a few GB
        length = 256 if quick else 1024
        per_seq = length // block
        nb = b * per_seq
        table = torch.arange(nb, device=device, dtype=torch.int32).reshape(b, per_seq)
        return (torch.randn(b, heads, d, device=device, dtype=torch.float16), r8(nb, block, kv_heads, d),
                r8(nb, block, kv_heads, d), scale(nb, block, kv_heads), scale(nb, block, kv_heads), table,
                torch.full((b,), length, device=device, dtype=torch.int32), 1.0 / math.sqrt(d))
    raise ValueError(f"unknown op {op!r}")


def _time(fn: Callable, args: tuple, quick: bool) -> float:
    """Median milliseconds, timed as `ptqrt bench` times (L2 flushed by a read before each run)."""
    from .bench_gpu import _bench

    return _bench(lambda: fn(*args), rep_ms=20 if quick else 80, warmup_ms=5 if quick else 20)


def nbytes(args: tuple) -> int:
    return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))


def copies_for(arg_bytes: int, l2_bytes: int) -> int:
    """Input copies to rotate over so that one round reads more than twice the L2 cache."""
    if arg_bytes <= 0:
        return 1
    return max(1, min(MAX_COPIES, math.ceil(2 * l2_bytes / arg_bytes)))


def _time_eager(fn: Callable, arg_sets: list, quick: bool, target_ms: float = 2.0) -> float:
    """Median milliseconds per call of back-to-back eager calls, rotating over arg_sets."""
    for args in arg_sets:  # compiles / autotunes outside the timing
        fn(*args)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for args in arg_sets:
        fn(*args)
    torch.cuda.synchronize()
    per_call = max((time.perf_counter() - t0) * 1e3 / len(arg_sets), 1e-4)
    calls = max(len(arg_sets), min(4000, math.ceil(target_ms / per_call)))
    times = []
    for _ in range(3 if quick else 7):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(calls):
            fn(*arg_sets[i % len(arg_sets)])
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3 / calls)
    return float(statistics.median(times))


def op_names(ops: Optional[Iterable[str]]) -> list:
    """The ops to time: all for None; an empty or unknown selection is refused (an empty one would
    rewrite the table without timing anything)."""
    names = [ops] if isinstance(ops, str) else list(ops) if ops is not None else list(_ops.OP_NAMES)
    if not names:
        raise ValueError(f"ptqrt.tune: ops is empty; name at least one of {', '.join(_ops.OP_NAMES)} "
                         f"(or pass None for all)")
    unknown = [n for n in names if n not in _ops.OP_NAMES]
    if unknown:
        raise ValueError(f"ptqrt.tune: unknown ops {unknown}; choose from {', '.join(_ops.OP_NAMES)}")
    return names


def tune(ops: Optional[Iterable[str]] = None, quick: bool = False, mode: str = "eager") -> Path:
    """Measure every available backend of every op (or of `ops`) per M-bucket on the current GPU,
    write the dispatch table for this GPU and return its path. mode: "eager" (back-to-back eager
    calls, launch cost included) or "kernel" (do_bench, L2 flushed). Refuses, before timing anything,
    a bad mode or op list (ValueError), then a machine without a CUDA GPU (bench_gpu.NoCudaDevice, a
    RuntimeError)."""
    if mode not in MODES:
        raise ValueError(f"ptqrt.tune: mode must be one of {', '.join(MODES)}; got {mode!r}")
    names = op_names(ops)
    if not torch.cuda.is_available():
        from .bench_gpu import NoCudaDevice

        raise NoCudaDevice("ptqrt.tune needs a CUDA GPU: it times the triton and cuda kernels on the device "
                           "whose dispatch table it writes, and no CUDA device is visible")
    device = torch.device("cuda")
    providers = {b: _ops._provider(b, device) for b in CANDIDATES}
    providers = {b: p for b, p in providers.items() if p}
    if not providers:
        warnings.warn("ptqrt.tune: neither the triton nor the cuda backend loads; timing the reference", RuntimeWarning)
        providers = {"reference": _ops._provider("reference", device)}
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 << 20)
    timings: dict = {}
    for op in names:
        timings[op] = {}
        for b, m in bucket_ms(quick).items():
            args = make_inputs(op, m, device, quick)
            arg_sets = [args]
            if mode == "eager":
                arg_sets += [make_inputs(op, m, device, quick) for _ in range(copies_for(nbytes(args), l2) - 1)]
            timings[op][b] = {}
            for backend, impls in providers.items():
                fn = impls.get(op)
                if fn is None:
                    continue
                try:
                    timings[op][b][backend] = (_time_eager(fn, arg_sets, quick) if mode == "eager"
                                               else _time(fn, args, quick))
                except Exception as e:  # noqa: BLE001 -- a backend failing at a shape just does not win it
                    warnings.warn(f"ptqrt.tune: {backend} {op} at M={m} failed: {str(e).splitlines()[0] if str(e) else e!r}",
                                  RuntimeWarning)
                    timings[op][b][backend] = None
            del args, arg_sets
        torch.cuda.empty_cache()
    extra = {"torch": torch.__version__, "quick": quick, "mode": mode, "backends": sorted(providers)}
    return write(timings, torch.cuda.get_device_name(), extra=extra)


__all__ = ["tune", "decide", "write", "op_names", "bucket_ms", "make_inputs", "copies_for", "CANDIDATES", "MODES"]
