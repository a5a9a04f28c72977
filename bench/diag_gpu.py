"""Where the time of one op call goes, per backend, on a CUDA device.

    python bench/diag_gpu.py [--backends triton,cuda] [--cases name,...|none] [--trace] [--sweep-decode]
                             [--profile N] [--ncu] [--k-sweep]

For each case and backend it prints four numbers (microseconds):
    bench   triton.testing.do_bench median, L2 flushed before each call as ptqrt bench flushes it
            (a read of do_bench's buffer: ptqrt.bench_gpu.l2_flush)
    graph   the same call captured in a CUDA graph and replayed (launch overhead removed), median
    host    wall time per call of 200 back-to-back calls without a sync: the launch rate; when it is
            above `graph`, the call is bound by the CPU, not the GPU
    kernels each CUDA kernel the call launches and its GPU time (torch.profiler), with --trace
With --profile N: the N Python functions with the most own time over 200 calls (cProfile), to see
where a CPU-bound call's host time goes.
With --k-sweep: w8a8_gemm at M = N = 8192 over K (do_bench, the L2 flushed as `ptqrt bench` does) per
backend, and the fit time = a + b K: a / (tile rounds) is the cost a tile pays whatever its K (launch,
pipeline fill, epilogue), b K the main loop's.
With --ncu: no timing; each case's call runs twice, then once between cudaProfilerStart / Stop inside
an NVTX range named "<case> <backend>", for Nsight Compute started with --profile-from-start off
(bench/device_check.sh's ncu stage: hardware counters of the kernels that miss their targets).
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch


def _cases(device):
    def gemm8(m, n, k):
        x = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
        xs, ws = torch.rand(m, device=device) + 0.01, torch.rand(n, device=device) + 0.01
        return "w8a8_gemm", (x, xs, w, ws, None, torch.float16)

    def gemm16(m, n, k):
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
        return "w8a16_gemm", (x, w, torch.rand(n, device=device) + 0.01, None, 0)

    def quant(m, k):
        return "quantize_per_token", (torch.randn(m, k, device=device, dtype=torch.float16), None)

    def append(t, h=32, d=128, bs=16):
        nb = 2 * t // bs + 8
        kc = torch.zeros(nb, bs, h, d, dtype=torch.int8, device=device)
        k = torch.randn(t, h, d, device=device, dtype=torch.float16)
        slots = torch.randperm(nb * bs, device=device)[:t]
        return "kv_cache_append", (k, torch.randn_like(k), kc, torch.zeros_like(kc), torch.ones(nb, bs, h, device=device),
                                   torch.ones(nb, bs, h, device=device), slots)

    def decode(b, length, h=32, d=128, bs=16):
        nb = b * length // bs
        kc = torch.randint(-127, 128, (nb, bs, h, d), dtype=torch.int8, device=device)
        vc = torch.randint(-127, 128, (nb, bs, h, d), dtype=torch.int8, device=device)
        ks = torch.rand(nb, bs, h, device=device) * 0.02 + 1e-3
        vs = torch.rand(nb, bs, h, device=device) * 0.02 + 1e-3
        bt = torch.randperm(nb, device=device).to(torch.int32).reshape(b, length // bs)
        sl = torch.full((b,), length, dtype=torch.int32, device=device)
        q = torch.randn(b, h, d, device=device, dtype=torch.float16)
        return "int8_kv_decode_attention", (q, kc, vc, ks, vs, bt, sl, 1.0 / math.sqrt(d))

    return {
        "w8a16_m1_4096": lambda: gemm16(1, 4096, 4096),
        "w8a16_m16_4096": lambda: gemm16(16, 4096, 4096),
        "w8a16_m1_28672": lambda: gemm16(1, 28672, 8192),
        "w8a16_m128_4096": lambda: gemm16(128, 4096, 4096),
        "w8a16_m1_4096x11008": lambda: gemm16(1, 4096, 11008),
        "w8a8_m1_4096": lambda: gemm8(1, 4096, 4096),
        "w8a8_m1_11008": lambda: gemm8(1, 11008, 4096),
        "w8a8_m16_4096x11008": lambda: gemm8(16, 4096, 11008),
        "w8a8_m512_4096x11008": lambda: gemm8(512, 4096, 11008),
        "w8a8_m512_4096": lambda: gemm8(512, 4096, 4096),
        "w8a8_m2048_4096": lambda: gemm8(2048, 4096, 4096),
        "w8a8_m8192_8192": lambda: gemm8(8192, 8192, 8192),
        "w8a8_m512_11008": lambda: gemm8(512, 11008, 4096),
        "w8a16_m16_28672": lambda: gemm16(16, 28672, 8192),
        "quant_m1_4096": lambda: quant(1, 4096),
        "quant_m8192_8192": lambda: quant(8192, 8192),
        "append_t4096": lambda: append(4096),
        "decode_b1_4096": lambda: decode(1, 4096),
        "decode_b16_4096": lambda: decode(16, 4096),
        "decode_b8_32768": lambda: decode(8, 32768),
    }


def _host_us(fn, n=200) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def _kernels(fn) -> list:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.count:
            total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
            out[e.key[:70]] = (e.count / 5, total / 5)
    return [(k, c, t) for k, (c, t) in out.items()]


def _profile(fn, top: int, n: int = 200) -> None:
    import cProfile

    from ptqrt.bench import profile_lines

    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    for line in profile_lines(prof, n, top):
        print("    " + line)


def _ncu_call(fn, label: str) -> None:
    """fn twice (compiles, autotunes, warms), then once inside the profiled window, as `label`."""
    fn()
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    torch.cuda.nvtx.range_push(label)
    try:
        fn()
        torch.cuda.synchronize()
    finally:  # a failure must not leave the next cases' warm-up calls in the profiled window
        torch.cuda.nvtx.range_pop()
        torch.cuda.profiler.stop()
    print(f"ncu: profiled {label}", flush=True)


def k_sweep(impls: dict, specs: dict, device, ks=(256, 1024, 2048, 4096, 8192), m=8192, n=8192,
            sms: int = 0) -> dict:
    """{backend: [(K, us)]} of w8a8_gemm at M x N over ks, printed with the least-squares line
    us = a + b K and a per round of 128 x 256 tiles (ceil(tiles / SMs) rounds)."""
    from ptqrt import bench_gpu

    sms = sms or torch.cuda.get_device_properties(device).multi_processor_count
    rounds = math.ceil(math.ceil(m / 128) * math.ceil(n / 256) / sms)
    out = {}
    print(f"\nw8a8_gemm M={m} N={n}: us per K (fit us = a + b K; a / {rounds} rounds = fixed cost a tile)")
    for b, table in impls.items():
        if not table or "w8a8_gemm" not in table:
            continue
        f, env, got = table["w8a8_gemm"], specs[b][1], []
        for k in ks:
            x = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
            w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
            xs, ws = torch.rand(m, device=device) + 0.01, torch.rand(n, device=device) + 0.01
            call = lambda: f(x, xs, w, ws, None, torch.float16)  # noqa: E731
            try:
                got.append((k, 1e3 * bench_gpu._bench(bench_gpu._with_env(call, env) if env else call)))
            except Exception as e:  # noqa: BLE001
                print(f"  {b} K={k}: FAILED {type(e).__name__}: {str(e)[:160]}")
        out[b] = got
        line = " ".join(f"{k}:{t:.1f}" for k, t in got)
        if len(got) >= 2:
            kk = [k for k, _ in got]
            tt = [t for _, t in got]
            km, tm = sum(kk) / len(kk), sum(tt) / len(tt)
            slope = sum((k - km) * (t - tm) for k, t in got) / sum((k - km) ** 2 for k in kk)
            a = tm - slope * km
            line += f"  | a {a:.1f} us ({a / rounds:.2f} a round), b {slope * 1e3:.2f} us per 1000 K"
        print(f"  {b:40s} {line}", flush=True)
    return out


def _backend(spec: str):
    """'cuda' or 'cuda:NAME=VALUE[:NAME=VALUE]' (a backend with its switches set for its calls)."""
    base, *env = spec.split(":")
    return base, dict(e.split("=", 1) for e in env)


def sweep_decode(device) -> None:
    """Triton decode attention over (BLOCK_L, num_warps, split waves): graph-replay median, us."""
    from ptqrt import bench_gpu
    from ptqrt.kernels import kv_cache

    cases = {n: f() for n, f in _cases(device).items() if n.startswith("decode")}
    keep = dict(kv_cache.DECODE), kv_cache.SPLIT_TARGET_WAVES
    print("\ntriton decode sweep (graph replay, us): BLOCK_L warps waves | " + " ".join(f"{n:>16s}" for n in cases))
    try:
        for block_l in (16, 32, 64, 128):
            for warps in (2, 4, 8):
                for waves in (4, 16):
                    kv_cache.DECODE.update(BLOCK_L=block_l, num_warps=warps)
                    kv_cache.SPLIT_TARGET_WAVES = waves
                    times = []
                    for _, (_, args) in cases.items():
                        try:
                            times.append(bench_gpu._bench_graph(lambda: kv_cache.int8_kv_decode_attention(*args)) * 1e3)
                        except Exception as e:  # noqa: BLE001
                            times.append(float("nan"))
                            print(f"  failed: {type(e).__name__}: {str(e)[:120]}")
                    print(f"  {block_l:4d} {warps:2d} {waves:3d} | " + " ".join(f"{t:16.1f}" for t in times), flush=True)
    finally:
        kv_cache.DECODE.clear()
        kv_cache.DECODE.update(keep[0])
        kv_cache.SPLIT_TARGET_WAVES = keep[1]


def main(argv=None) -> int:
    import triton

    from ptqrt import bench_gpu, ops

    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="triton,cuda")
    ap.add_argument("--cases", default="", help="comma-separated case names; 'none' for none")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--sweep-decode", action="store_true")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="print the N functions with the most own host time per call (cProfile)")
    ap.add_argument("--k-sweep", action="store_true", help="w8a8_gemm at 8192 x 8192 over K, per backend")
    ap.add_argument("--ncu", action="store_true",
                    help="no timing: one call per case and backend inside cudaProfilerStart/Stop (for ncu)")
    a = ap.parse_args(argv)
    device = torch.device("cuda")
    cases = _cases(device)
    names = [c for c in a.cases.split(",") if c and c != "none"] if a.cases else list(cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
        ap.error(f"unknown cases {unknown}; choose from {', '.join(cases)}")
    specs = {b: _backend(b) for b in a.backends.split(",") if b}
    impls = {b: ops._provider(base, device) for b, (base, _) in specs.items()}
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    if not a.ncu:
        print(f"{'case':18s} {'backend':7s} {'bench':>8s} {'graph':>8s} {'host':>8s}")
    with torch.no_grad():
        for name in names:
            op, args = cases[name]()
            for b, table in impls.items():
                if not table or op not in table:
                    continue
                env = specs[b][1]
                fn = lambda f=table[op]: f(*args)  # noqa: E731
                if env:
                    fn = bench_gpu._with_env(fn, env)
                if a.ncu:
                    try:
                        _ncu_call(fn, f"{name} {b}")
                    except Exception as e:  # noqa: BLE001
                        print(f"{name:18s} {b:7s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                try:
                    bench = bench_gpu._bench(fn) * 1e3
                    try:
                        graph = bench_gpu._bench_graph(fn) * 1e3
                    except Exception as e:  # noqa: BLE001
                        print(f"  graph capture failed: {type(e).__name__}: {e}")
                        graph = float("nan")
                    host = _host_us(fn)
                    print(f"{name:18s} {b:7s} {bench:8.1f} {graph:8.1f} {host:8.1f}", flush=True)
                    if a.profile:
                        _profile(fn, a.profile)
                    if a.trace:
                        for k, c, t in _kernels(fn):
                            print(f"    {c:4.1f}x {t:8.1f} us  {k}")
                except Exception as e:  # noqa: BLE001
                    print(f"{name:18s} {b:7s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            del args
            torch.cuda.empty_cache()
        if a.sweep_decode:
            sweep_decode(device)
        if a.k_sweep:
            k_sweep(impls, specs, device)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
