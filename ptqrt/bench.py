"""The measuring code behind `ptqrt bench` on the CPU (the GPU suite is ptqrt/bench_gpu.py).

Each ptqrt op is timed against its float peer in the same process, and reported as a ratio; results
are written to bench/results/ tagged with the CPU model, thread count and versions.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

DEFAULT_MS = (1, 16, 128)
DEFAULT_NK = ((4096, 4096), (11008, 4096), (4096, 11008))


def median_ms(fn: Callable, warmup: int = 2, repeats: int = 10, max_seconds: float = 2.0) -> float:
    """Median wall time of fn() in ms; stops early after max_seconds of measuring (at least 3 runs)."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if i >= 2 and time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times)


@contextlib.contextmanager
def environ(env: dict):
    """The block runs with `env` set in os.environ, which is restored after (the backends read their
    switches on every call)."""
    old = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def profile_lines(prof, per: int, top: int, unit: str = "call") -> list[str]:
    """The `top` functions with the most own time in a cProfile.Profile, per `unit` (prof covered
    `per` of them): own and cumulative microseconds and calls per unit, and where each function is."""
    import pstats

    out = [f"{'own us/' + unit:>12} {'cum us/' + unit:>12} {'calls/' + unit:>11}  function"]
    rows = sorted(pstats.Stats(prof).stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    for (file, line, name), (_, ncalls, tottime, cumtime, _) in rows:
        where = f"{Path(file).name}:{line}" if line else file
        out.append(f"{tottime / per * 1e6:12.1f} {cumtime / per * 1e6:12.1f} {ncalls / per:11.1f}  {name} ({where})")
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import numpy

    return {"device": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


@torch.no_grad()
def bench_linear_ops(ms=DEFAULT_MS, nks=DEFAULT_NK, repeats: int = 10) -> list[dict]:
    """Per (M, N, K): fp32 F.linear vs ptqrt w8a16_gemm and quantize_per_token + w8a8_gemm."""
    from . import ops
    from .reference import quantize_weight

    rows = []
    for n, k in nks:
        w = torch.randn(n, k) * 0.02
        w_q, w_s = quantize_weight(w)
        for m in ms:
            x = torch.randn(m, k)
            t_fp32 = median_ms(lambda: F.linear(x, w), repeats=repeats)
            t_a16 = median_ms(lambda: ops.w8a16_gemm(x, w_q, w_s, None, 0), repeats=repeats)

            def w8a8():
                x_q, x_s = ops.quantize_per_token(x)
                return ops.w8a8_gemm(x_q, x_s, w_q, w_s, None, torch.float32)

            t_a8 = median_ms(w8a8, repeats=repeats)
            for op, t, gemm in (("w8a16_gemm", t_a16, "w8a16_gemm"), ("quantize_per_token+w8a8_gemm", t_a8, "w8a8_gemm")):
                rows.append({"op": op, "backend": ops.backend_for(gemm, "cpu", m), "M": m, "N": n, "K": k,
                             "ms": round(t, 4), "fp32_linear_ms": round(t_fp32, 4),
                             "speedup_vs_fp32": round(t_fp32 / t, 3)})
    return rows


def print_rows(rows: list[dict]) -> None:
    head = f"{'op':<30}{'backend':<10}{'M':>6}{'N':>7}{'K':>7}{'ms':>10}{'fp32 ms':>10}{'speedup':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['op']:<30}{r['backend']:<10}{r['M']:>6}{r['N']:>7}{r['K']:>7}{r['ms']:>10.3f}"
              f"{r['fp32_linear_ms']:>10.3f}{r['speedup_vs_fp32']:>8.2f}x")


def write_results(rows: list[dict], out_dir, stem: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    jpath, cpath = out / f"{stem}-{stamp}.json", out / f"{stem}-{stamp}.csv"
    jpath.write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    with open(cpath, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]) + list(env))
        wr.writeheader()
        for r in rows:
            wr.writerow({**r, **env})
    return jpath, cpath
