"""The host CPU check (bench/cpu_host_check.sh), its hook in bench/device_check.sh, and the targets
summary of bench/bench_cpu.py. Nothing here builds, benchmarks or needs a GPU."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "bench" / "cpu_host_check.sh"
DEVICE_CHECK = ROOT / "bench" / "device_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or not sys.platform.startswith("linux"),
                                reason="the device scripts are bash on Linux")


def _bash(*args, env=None, timeout=60):
    return subprocess.run(["bash", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_cpu_under_test", ROOT / "bench" / "bench_cpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _diag_module():
    spec = importlib.util.spec_from_file_location("diag_gpu_under_test", ROOT / "bench" / "diag_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(l for l in f if l.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


@pytest.mark.parametrize("script", (CHECK, DEVICE_CHECK))
def test_scripts_parse(script):
    r = _bash("-n", script)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", (CHECK, DEVICE_CHECK))
def test_unknown_flag_prints_usage_and_does_nothing(script):
    r = _bash(script, "--no-such-flag")
    assert r.returncode == 2
    assert "usage" in r.stdout
    if script == DEVICE_CHECK:
        assert "--no-cpu" in r.stdout


def test_pick_cores():
    r = _bash(CHECK, "--pick-cores")
    assert r.returncode == 0, r.stderr
    fields = r.stdout.split()
    picked = [int(c) for c in fields[0].split(",")]
    rest = [int(c) for c in fields[1].split(",")] if len(fields) > 1 else []
    allowed = sorted(os.sched_getaffinity(0))
    assert 1 <= len(picked) <= 2 and len(set(picked)) == len(picked)
    assert sorted(picked + rest) == allowed


@pytest.mark.skipif({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= _flags(),
                    reason="this CPU has AVX-512 VNNI: the check would build and benchmark")
def test_without_vnni_reports_and_exits_at_once(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    r = _bash(CHECK, env={"OUT": str(out)}, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no AVX-512 VNNI" in r.stdout and "avx512_vnni no" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["cpu_summary.txt"]
    # with a log folder of the caller's (bench/device_check.sh), the summary goes there, not to OUT
    logs = tmp_path / "logs"
    out2 = tmp_path / "out2"
    out2.mkdir()
    r = _bash(CHECK, "--log-dir", logs, env={"OUT": str(out2)}, timeout=30)
    assert r.returncode == 0
    assert "no AVX-512 VNNI" in (logs / "cpu_summary.txt").read_text()
    assert not list(out2.iterdir())


def test_device_check_cpu_stage_wiring():
    """The stage starts after the install, is skippable, and is waited for in finish()."""
    text = DEVICE_CHECK.read_text()
    assert text.index("cpu_start\n") > text.index("stage install")
    assert "--no-cpu) CPU=0" in text and "SKIP_CPU" in text
    finish = text[text.index("finish() {"):]
    assert finish.index("cpu_wait") < finish.index("=== summary")
    assert "cpu_summary.txt" in finish


def test_ncu_stage(monkeypatch, capsys):
    """The device check's Nsight Compute stage names cases that exist in bench/diag_gpu.py, and
    --ncu's call runs the op twice outside and once inside the profiler window, in an NVTX range."""
    import re

    text = DEVICE_CHECK.read_text()
    assert "--profile-from-start off" in text and "--clock-control none" in text
    stage = text[text.index("stage ncu"):text.index("# 4b.")]
    diag = _diag_module()
    import torch

    cases = diag._cases(torch.device("cpu"))
    named = {c for group in re.findall(r"--cases ([\w,]+)", stage) for c in group.split(",")}
    assert named and named <= set(cases), named - set(cases)
    assert diag._backend("cuda") == ("cuda", {})
    assert diag._backend("cuda:A=1:B=x=2") == ("cuda", {"A": "1", "B": "x=2"})

    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: seen.append("start"))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: seen.append("stop"))
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: seen.append(f"push {name}"))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: seen.append("pop"))
    diag._ncu_call(lambda: seen.append("call"), "case cuda")
    assert seen == ["call", "call", "start", "push case cuda", "call", "pop", "stop"]
    assert "ncu: profiled case cuda" in capsys.readouterr().out
    seen.clear()

    def third_fails():
        seen.append("call")
        if len([s for s in seen if s == "call"]) == 3:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        diag._ncu_call(third_fails, "bad cuda")
    assert seen == ["call", "call", "start", "push bad cuda", "call", "pop", "stop"]  # the window closed


def test_device_check_times_every_variant():
    """Every variant of bench_gpu.VARIANTS is in the device check's backends (the CUDA ones once
    the extension is built), and nothing there is unknown."""
    import re

    from ptqrt import bench_gpu

    text = DEVICE_CHECK.read_text()
    lists = [set(m.split(",")) for m in re.findall(r"BACKENDS=([\w,-]+)", text)]
    assert len(lists) == 2
    triton_only, full = lists
    assert {v for v, spec in bench_gpu.VARIANTS.items() if spec[0] == "triton"} <= triton_only
    assert set(bench_gpu.VARIANTS) <= full
    assert full - set(bench_gpu.VARIANTS) == {"triton", "cuda"} and triton_only <= full


def test_k_sweep_fit(monkeypatch, capsys):
    """diag_gpu --k-sweep: each backend's times over K, with its switches set for each call, and the
    least-squares line through them (here exact: 100 us + 20 us per 1000 K)."""
    import torch

    from ptqrt import bench_gpu

    diag = _diag_module()
    seen = []

    def fake_gemm(x, xs, w, ws, bias, dtype):
        seen.append((x.shape[1], os.environ.get("PTQRT_X")))

    monkeypatch.setattr(bench_gpu, "_bench", lambda fn, rep_ms=40: (fn(), (100 + 0.02 * seen[-1][0]) / 1e3)[1])
    specs = {"cuda": ("cuda", {}), "cuda:PTQRT_X=1": ("cuda", {"PTQRT_X": "1"})}
    impls = {b: {"w8a8_gemm": fake_gemm} for b in specs}
    got = diag.k_sweep(impls, specs, torch.device("cpu"), ks=(64, 128, 256), m=256, n=512, sms=2)
    assert [k for k, _ in got["cuda"]] == [64, 128, 256]
    assert seen == [(64, None), (128, None), (256, None), (64, "1"), (128, "1"), (256, "1")]
    out = capsys.readouterr().out
    assert out.count("a 100.0 us (50.00 a round), b 20.00 us per 1000 K") == 2  # 2 x 2 tiles on 2 SMs


def test_targets_and_report(tmp_path):
    bench = _bench_module()
    assert len(bench.TARGETS) == 9 + 3 + 3 + 2
    g = "w8a8 M=1 N=4096 K=4096"
    results = {
        g: {"ptqrt quant+w8a8": {"median_s": 1.0}, "fbgemm dynamic": {"median_s": 1.3}},
        "w8a8 M=128 N=4096 K=4096": {"ptqrt quant+w8a8": {"median_s": 1.0}, "fbgemm dynamic": {"median_s": 1.1},
                                     "fp32 F.linear": {"median_s": 4.5}},
        f"attn B=8 L=4096 H={bench.HEADS} D={bench.HEAD_DIM}": {"ptqrt int8-KV decode": {"median_s": 2.0},
                                                              "fp32 SDPA": {"median_s": 2.9}},
    }
    got = {(t["group"], t["peer"]): t for t in bench.targets(results)}
    assert got[(g, "fbgemm dynamic")]["status"] == "PASS"
    assert got[(g, "fbgemm dynamic")]["ratio"] == pytest.approx(1.3)
    assert got[("w8a8 M=128 N=4096 K=4096", "fbgemm dynamic")]["status"] == "MISS"
    assert got[("w8a8 M=128 N=4096 K=4096", "fp32 F.linear")]["status"] == "PASS"
    assert got[(f"attn B=8 L=4096 H={bench.HEADS} D={bench.HEAD_DIM}", "fp32 SDPA")]["status"] == "MISS"
    assert got[("w8a16 M=1 N=4096 K=4096", "fp32 F.linear")]["status"] == "n/a"
    meta = {"device": "Some CPU", "isa": "avx512", "best_isa": "avx512", "threads": 2, "cpus": [14, 15],
            "set": "targets"}
    lines = bench.target_lines(meta, bench.targets(results))
    assert "Some CPU" in lines[0] and "path avx512" in lines[0] and "2 threads" in lines[0] and "14,15" in lines[0]
    assert sum(l.startswith(("PASS", "MISS")) for l in lines) == 4
    assert lines[-1].startswith("targets: 2 PASS, 2 MISS, 13 not measured")
    # the command-line report of a (partial) JSON, as bench/cpu_host_check.sh uses it
    path = tmp_path / "cpu_test.json"
    path.write_text(json.dumps({**meta, "partial": True, "results": results}))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_cpu.py"), str(path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "targets: 2 PASS, 2 MISS" in r.stdout and "partial" in r.stdout


def test_paired_times_alternate_under_each_side_environment(monkeypatch):
    """The paired timing: samples alternate a, b, b, a, a, b, ...; each side's calls run under its
    own environment (the cpu backend reads its knobs per call), restored afterwards; one untimed call
    leads every sample; the sample length sets the calls per sample."""
    bench = _bench_module()
    monkeypatch.setenv("PTQRT_TEST_PAIR", "outer")
    monkeypatch.delenv("PTQRT_TEST_PAIR_B", raising=False)
    calls = []

    def side(name):
        def fn():
            calls.append((name, os.environ.get("PTQRT_TEST_PAIR"), os.environ.get("PTQRT_TEST_PAIR_B")))
        return fn

    ta, tb = bench.paired_times((side("a"), {"PTQRT_TEST_PAIR": "A"}),
                                (side("b"), {"PTQRT_TEST_PAIR": "B", "PTQRT_TEST_PAIR_B": "1"}), rounds=4, sample_s=0)
    assert len(ta) == len(tb) == 4 and all(t >= 0 for t in ta + tb)
    assert os.environ["PTQRT_TEST_PAIR"] == "outer" and "PTQRT_TEST_PAIR_B" not in os.environ
    assert all(c[1:] == ("A", None) for c in calls if c[0] == "a")
    assert all(c[1:] == ("B", "1") for c in calls if c[0] == "b")
    # the calls per sample come from one call of each (after a first one), then 4 rounds of
    # (untimed + 1 timed) per side, in the order a b | b a | a b | b a
    order = "".join(c[0] for c in calls)
    assert order == "aa" + "bb" + "aabb" + "bbaa" + "aabb" + "bbaa"
    # a paired ratio shows beside the target's own, which still decides PASS / MISS
    g = "w8a8 M=1 N=4096 K=4096"
    results = {g: {"ptqrt quant+w8a8": {"median_s": 1.0}, "fbgemm dynamic": {"median_s": 1.1}}}
    paired = {g: {"ptqrt quant+w8a8 vs fbgemm dynamic": {"ratio": 1.31}}}
    t = next(t for t in bench.targets(results, paired) if t["group"] == g and t["peer"] == "fbgemm dynamic")
    assert t["status"] == "MISS" and t["paired"] == pytest.approx(1.31)
    line = next(l for l in bench.target_lines({}, bench.targets(results, paired)) if l.startswith("MISS"))
    assert "1.10x (target >= 1.2x; paired 1.31x)" in line
    paired["w8a8 M=16 N=4096 K=4096"] = {f"{bench.DOT_TILES} vs ptqrt quant+w8a8": {"ratio": 1.5}}
    lines = bench.target_lines({}, bench.targets(results, paired), paired)
    assert lines[-2] == f"diagnosis {'w8a8 M=16 N=4096 K=4096':<32} {bench.DOT_TILES}: 1.50x the default's speed (paired)"
    assert lines[-1].startswith("targets: 0 PASS, 1 MISS")


@pytest.mark.parametrize("name,count", (("targets", 90), ("quick", 29), ("full", 150), ("smoke", 9)))
def test_bench_sets_collect(name, count):
    r = subprocess.run([sys.executable, "-m", "pytest", "bench/bench_cpu.py", "--collect-only", "-q",
                        "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PTQRT_BENCH_SET": name, "PTQRT_BENCH_FULL": "0"})
    assert f"{count} tests collected" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
