"""CPU backend benchmarks (pytest-benchmark): each ptqrt op against its peers, in one process.

    python -m pytest bench/bench_cpu.py --benchmark-enable -s                    # quick subset
    PTQRT_BENCH_FULL=1 python -m pytest bench/bench_cpu.py --benchmark-enable -s # the whole sweep
    PTQRT_BENCH_THREADS=1 ... --benchmark-timer=time.process_time                # on a shared machine

(The project's pytest config passes --benchmark-disable; --benchmark-enable turns timing back on.)
On a machine shared with other work, wall-clock medians of multi-threaded runs measure the
scheduler: one thread and CPU time (process_time) give stable ratios.

Groups (one pytest-benchmark group per shape, so its table shows each row's ratio to the fastest):
  w8a8   ptqrt quantize_per_token + w8a8_gemm (fp32 out) | w8a8_gemm alone | torch fbgemm dynamic
         int8 Linear (quantize_dynamic) | torch._int_mm (int8 in, int32 out) | fp32 F.linear
  w8a16  ptqrt w8a16_gemm (fp32 and bf16 activations) | fp32 F.linear | bf16 F.linear
  attn   ptqrt int8_kv_decode_attention (paged, block 16, dynamic scales) | fp32 SDPA on a dense cache
At the end a summary prints medians, the ratios the issue asks for, and the memory floor (bytes moved
/ the copy bandwidth measured in the same run); it is also written to bench/results/cpu_<host>.json.
Timings are medians; nothing here asserts a timing.
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

FULL = os.environ.get("PTQRT_BENCH_FULL", "0") == "1"
MS = (1, 16, 128) if FULL else (1, 128)
NKS = ((4096, 4096), (11008, 4096), (4096, 11008)) if FULL else ((4096, 4096),)
ATTN = tuple((b, l) for b in (1, 8) for l in (512, 4096)) if FULL else ((1, 4096), (8, 512))
HEADS, HEAD_DIM, BLOCK = 32, 128, 16

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


@pytest.mark.parametrize("impl", W8A8_IMPLS)
@pytest.mark.parametrize("n,k", NKS)
@pytest.mark.parametrize("m", MS)
def test_w8a8(benchmark, ops, m, n, k, impl):
    torch.manual_seed(0)
    group = f"w8a8 M={m} N={n} K={k}"
    benchmark.group = group
    x = torch.randn(m, k)
    w = torch.randn(n, k) * 0.02
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    w_s = torch.rand(n) * 0.01
    x_q, x_s = ops.quantize_per_token(x, None)
    if impl == "ptqrt quant+w8a8":
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


@pytest.mark.parametrize("impl", W8A16_IMPLS)
@pytest.mark.parametrize("n,k", NKS)
@pytest.mark.parametrize("m", MS)
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
@pytest.mark.parametrize("impl", ("ptqrt int8-KV decode", "fp32 SDPA"))
@pytest.mark.parametrize("b,length", ATTN)
def test_decode_attention(benchmark, ops, b, length, impl):
    torch.manual_seed(0)
    group = f"attn B={b} L={length} H={HEADS} D={HEAD_DIM}"
    benchmark.group = group
    q = torch.randn(b, HEADS, HEAD_DIM)
    sm = HEAD_DIM ** -0.5
    if impl.startswith("ptqrt"):
        nblk = b * length // BLOCK
        kc = torch.randint(-127, 128, (nblk, BLOCK, HEADS, HEAD_DIM), dtype=torch.int8)
        vc = torch.randint(-127, 128, (nblk, BLOCK, HEADS, HEAD_DIM), dtype=torch.int8)
        ks, vs = torch.rand(nblk, BLOCK, HEADS) * 0.02, torch.rand(nblk, BLOCK, HEADS) * 0.02
        bt = torch.randperm(nblk, dtype=torch.int32).reshape(b, length // BLOCK)
        sl = torch.full((b,), length, dtype=torch.int32)
        fn = lambda: ops.int8_kv_decode_attention(q, kc, vc, ks, vs, bt, sl, sm)  # noqa: E731
        nbytes = 2 * kc.numel() + 2 * ks.numel() * 4
    else:
        k = torch.randn(b, HEADS, length, HEAD_DIM)
        v = torch.randn(b, HEADS, length, HEAD_DIM)
        q4 = q[:, :, None, :]
        fn = lambda: F.scaled_dot_product_attention(q4, k, v, scale=sm)  # noqa: E731
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


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if not _results:
        return
    bw = _copy_bandwidth()
    lines = [f"device: {_cpu_model()}, ptqrt_cpu path {torch.ops.ptqrt_cpu.active_isa()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, "
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
    print("\n" + "\n".join(lines))
    out = Path(__file__).resolve().parent / "results" / f"cpu_{platform.node() or 'host'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": _cpu_model(), "isa": torch.ops.ptqrt_cpu.active_isa(),
                               "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "copy_bandwidth_Bps": bw, "full": FULL, "results": _results}, indent=1))
