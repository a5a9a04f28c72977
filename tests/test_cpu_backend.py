"""The C++ CPU backend (csrc/cpu, ops torch.ops.ptqrt_cpu.*) against ptqrt/reference.py.

Every instruction-set path this CPU can run is tested, forced through PTQRT_CPU_ISA:
  scalar, avx2, avx512 (AVX-512 VNNI; skipped on CPUs without it) and avx512-emulated (the VNNI
  kernel's own code with each intrinsic replaced by a portable model of the instruction).
int32 accumulators must equal the reference bit for bit; quantized int8 values too (same divisions,
same round-half-even); float results (w8a16, attention) within tolerance.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ptqrt.ops as pops
from ptqrt import _build
from ptqrt import reference as ref

from util import ODD_M, ODD_NK, assert_close_to_ref, rand_int8, rand_scale

ISAS = ("scalar", "avx2", "avx512", "avx512-emulated")
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _library() -> str:
    """Path of the loaded extension (loaded once per process: a second load of another build would
    register the ptqrt_cpu namespace twice). A failed build fails the test with the compiler's log."""
    path = _build.load("cpu")
    if path is None:
        path = _build.build("cpu", verbose=True)  # raises, showing why
    return path


@pytest.fixture(scope="module")
def cpu_ops():
    """The compiled backend; a failed build fails these tests (it must build wherever they run)."""
    _library()
    return torch.ops.ptqrt_cpu


def _supported(cpu_ops, isa: str) -> bool:
    best = cpu_ops.best_isa()
    return {"scalar": True, "avx512-emulated": True, "avx2": best in ("avx2", "avx512"),
            "avx512": best == "avx512"}[isa]


def _force(request, cpu_ops, monkeypatch):
    name = request.param
    if not _supported(cpu_ops, name):
        pytest.skip(f"this CPU has no {name} (its best path is {cpu_ops.best_isa()}); the avx512 VNNI kernel's "
                    f"code still runs here as 'avx512-emulated'")
    monkeypatch.setenv("PTQRT_CPU_ISA", name)
    assert cpu_ops.active_isa() == name
    return name


@pytest.fixture(params=ISAS)
def gemm_isa(request, cpu_ops, monkeypatch):
    """Force one w8a8 path for the test; skip the ones this CPU cannot run, saying why."""
    return _force(request, cpu_ops, monkeypatch)


@pytest.fixture(params=ISAS[:3])
def isa(request, cpu_ops, monkeypatch):
    """The same for the other ops (under avx512-emulated they take the scalar path: not repeated)."""
    return _force(request, cpu_ops, monkeypatch)


def _dirty_heap(nbytes: int) -> None:
    """Leave freed, poisoned memory behind so that an output the kernel forgets to write shows up as
    garbage instead of lucky zeros (small allocations reuse freed chunks)."""
    t = torch.full((max(nbytes, 1),), -7, dtype=torch.int8)
    del t


# ------------------------------------------------------------------------------------------ w8a8
W8A8_NK = ODD_NK + ((70, 200), (9, 129), (5, 64))


@pytest.mark.parametrize("m", (0,) + ODD_M)
@pytest.mark.parametrize("n,k", W8A8_NK)
def test_w8a8_int32_exact(cpu_ops, gemm_isa, m, n, k):
    x, w = rand_int8(m, k), rand_int8(n, k)
    _dirty_heap(4 * m * n)
    out = cpu_ops.w8a8_gemm(x, rand_scale(m), w, rand_scale(n), None, torch.int32)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out, ref.int32_matmul(x, w))


@pytest.mark.parametrize("m", (5, 29, 37))  # (cached weights: VNNI GEMV form at 5, panel kernels beyond)
def test_w8a8_full_int8_range_exact(cpu_ops, gemm_isa, m):
    # -128 too: the AVX2 path widens to int16 (no vpmaddubsw saturation), VNNI offsets by 128.
    x = torch.randint(-128, 128, (m, 300), dtype=torch.int8)
    w = torch.randint(-128, 128, (7, 300), dtype=torch.int8)
    x[0], w[0] = -128, -128
    out = cpu_ops.w8a8_gemm(x, torch.ones(m), w, torch.ones(7), None, torch.int32)
    assert torch.equal(out, ref.int32_matmul(x, w))


@pytest.mark.parametrize("m,n,k", ((24, 37, 5000), (29, 16, 4096), (131, 50, 2003), (40, 3, 8200), (45, 70, 9001),
                                   (301, 70, 100)))
def test_w8a8_long_k_and_blocks(cpu_ops, gemm_isa, m, n, k):
    """K over several of the panel kernels' K chunks (4096 or fewer, ragged last one), M across the
    driver's equal m-blocks of at most 128 rows (131: 66 + 65; 301: 101 + 101 + 99, neither a multiple
    of 6 nor of 8), N with partial 16- and 32-column panels, row groups cut short (6-row groups on
    AVX2, 8-row on VNNI)."""
    x, w = rand_int8(m, k), rand_int8(n, k)
    _dirty_heap(4 * m * n)
    out = cpu_ops.w8a8_gemm(x, rand_scale(m), w, rand_scale(n), None, torch.int32)
    assert torch.equal(out, ref.int32_matmul(x, w))


@pytest.mark.parametrize("m", (1, 3, 40))
def test_w8a8_k_zero(cpu_ops, gemm_isa, m):
    """K = 0: every sum is 0 (no kernel loop runs, so nothing may be left unwritten)."""
    x, w, xs, ws, b = rand_int8(m, 0), rand_int8(20, 0), rand_scale(m), rand_scale(20), torch.randn(20)
    _dirty_heap(4 * m * 20)
    assert torch.equal(cpu_ops.w8a8_gemm(x, xs, w, ws, None, torch.int32), torch.zeros(m, 20, dtype=torch.int32))
    assert_close_to_ref(cpu_ops.w8a8_gemm(x, xs, w, ws, b, torch.float32), ref.w8a8_gemm(x, xs, w, ws, b, torch.float32))


def test_w8a8_int32_refuses_a_bias(cpu_ops):
    """The raw int32 sums have no epilogue: a bias there would be dropped silently, so it is refused."""
    with pytest.raises(RuntimeError, match="a bias needs a float out_dtype"):
        cpu_ops.w8a8_gemm(rand_int8(2, 8), torch.ones(2), rand_int8(3, 8), torch.ones(3), torch.ones(3), torch.int32)


@pytest.mark.parametrize("m", (1, 3, 25))
@pytest.mark.parametrize("fill", ("max", "min", "int8_min", "random"))
def test_w8a8_k_at_overflow_bound(cpu_ops, gemm_isa, m, fill):
    k, n = ref.MAX_K_INT32, 5
    x, w = rand_int8(m, k), rand_int8(n, k)
    if fill == "int8_min":  # -128 * -128 * K = 2**31 - 16384, the largest sum int8 inputs can make here
        x.fill_(-128)
        w.fill_(-128)
    elif fill != "random":
        x.fill_(127)
        w.fill_(127 if fill == "max" else -127)
    out = cpu_ops.w8a8_gemm(x, rand_scale(m), w, rand_scale(n), None, torch.int32)
    assert torch.equal(out, ref.int32_matmul(x, w))
    if fill != "random":
        q = 128 if fill == "int8_min" else 127
        assert abs(int(out[0, 0])) == q * q * k


@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("per_tensor", (False, True))
@pytest.mark.parametrize("bias_dtype", (None, torch.float32, torch.bfloat16))
def test_w8a8_epilogue(cpu_ops, gemm_isa, out_dtype, per_tensor, bias_dtype):
    m, n, k = 17, 72, 100
    x, w = rand_int8(m, k), rand_int8(n, k)
    xs, ws = rand_scale(1 if per_tensor else m), rand_scale(n)
    bias = None if bias_dtype is None else torch.randn(n).to(bias_dtype)
    _dirty_heap(4 * m * n)
    out = cpu_ops.w8a8_gemm(x, xs, w, ws, bias, out_dtype)
    assert out.dtype == out_dtype
    assert_close_to_ref(out, ref.w8a8_gemm(x, xs, w, ws, bias, out_dtype))


def test_w8a8_paths_agree_bit_for_bit(cpu_ops, monkeypatch):
    """Every path this CPU runs gives the same bits, epilogue included (it is shared code)."""
    m, n, k = 19, 37, 333
    x, w, xs, ws, b = rand_int8(m, k), rand_int8(n, k), rand_scale(m), rand_scale(n), torch.randn(n)
    outs = {}
    for name in (i for i in ISAS if _supported(cpu_ops, i)):
        monkeypatch.setenv("PTQRT_CPU_ISA", name)
        outs[name] = [cpu_ops.w8a8_gemm(x, xs, w, ws, b if dt != torch.int32 else None, dt)
                      for dt in FLOATS + (torch.int32,)]
    first = next(iter(outs.values()))
    for name, o in outs.items():
        for a, b_ in zip(first, o):
            assert torch.equal(a, b_), name


@pytest.mark.parametrize("isa", ("avx512", "avx512-emulated"))
def test_vnni_panel_rows_knob(cpu_ops, monkeypatch, isa):
    """PTQRT_CPU_VNNI_PANEL_ROWS moves the VNNI path's panel / dot-tile crossover (a diagnosis knob,
    read on every call): the same bits either side of it; a bad value is refused, naming it."""
    if not _supported(cpu_ops, isa):
        pytest.skip(f"this CPU cannot run {isa}")
    monkeypatch.setenv("PTQRT_CPU_ISA", isa)
    x, w, xs, ws = rand_int8(16, 300), rand_int8(40, 300), rand_scale(16), rand_scale(40)
    outs = []
    for rows in ("", "1", "17", "100"):
        monkeypatch.setenv("PTQRT_CPU_VNNI_PANEL_ROWS", rows)
        outs.append(cpu_ops.w8a8_gemm(x, xs, w, ws, None, torch.int32))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert torch.equal(outs[0], ref.w8a8_gemm(x, xs, w, ws, None, torch.int32))
    # It takes effect: the panel kernel caches the weights' quads, the dot tiles read w as it is.
    for rows, cached in (("17", 0), ("16", 1)):
        with _pack_budget(cpu_ops, 1 << 30):  # (a new budget empties the cache)
            monkeypatch.setenv("PTQRT_CPU_VNNI_PANEL_ROWS", rows)
            cpu_ops.w8a8_gemm(x, xs, w, ws, None, torch.int32)
            assert cpu_ops.pack_cache_info()[0] == cached, rows
    for bad in ("0", "-3", "many", "4x"):
        monkeypatch.setenv("PTQRT_CPU_VNNI_PANEL_ROWS", bad)
        with pytest.raises(RuntimeError, match="PTQRT_CPU_VNNI_PANEL_ROWS"):
            cpu_ops.w8a8_gemm(x, xs, w, ws, None, torch.int32)


@pytest.mark.parametrize("isa", ("avx512", "avx512-emulated"))
@pytest.mark.parametrize("m", (1, 2, 3, 4, 5, 6))
@pytest.mark.parametrize("n,k", ((1, 1), (31, 64), (32, 333), (96, 4096), (129, 5), (300, 130), (520, 1001)))
def test_vnni_gemv(cpu_ops, monkeypatch, isa, m, n, k):
    """1-6 rows on the cached quads take the GEMV form (up to 4, 3 or 2 panels at once over the whole
    K, 2 n-blocks a thread): exact against the reference and the same bits as the dot tiles on w as it
    is, epilogue included; with 1 and 2 threads (the n-blocks, and so the panels a call takes, follow
    the thread count): 1-4 whole panels per call and a partial one (1, 31, 129, 300, 520 columns),
    ragged K, -128 in both operands."""
    if not _supported(cpu_ops, isa):
        pytest.skip(f"this CPU cannot run {isa}")
    monkeypatch.setenv("PTQRT_CPU_ISA", isa)
    x, w = rand_int8(m, k), rand_int8(n, k)
    x[0, 0], x[-1, -1], w[0, 0], w[-1, -1] = -128, -128, -128, -128
    xs, ws, bias = rand_scale(m), rand_scale(n), torch.randn(n)
    expect = ref.int32_matmul(x, w)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            outs = {}
            with _pack_budget(cpu_ops, 1 << 30):
                for rows, path in (("", "vnni-gemv"), ("7", "vnni-dot")):
                    monkeypatch.setenv("PTQRT_CPU_VNNI_PANEL_ROWS", rows)
                    _dirty_heap(4 * m * n)
                    outs[path] = (cpu_ops.w8a8_gemm(x, xs, w, ws, None, torch.int32),
                                  cpu_ops.w8a8_gemm(x, xs, w, ws, bias, torch.float32))
                    assert cpu_ops.last_w8a8_path() == path
                assert cpu_ops.pack_cache_info()[0] == 1
            assert torch.equal(outs["vnni-gemv"][0], expect), t
            assert torch.equal(outs["vnni-gemv"][0], outs["vnni-dot"][0]), t
            assert torch.equal(outs["vnni-gemv"][1], outs["vnni-dot"][1]), t
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("m", (1, 5))
def test_vnni_gemv_prefetch_knob(cpu_ops, monkeypatch, m):
    """PTQRT_CPU_GEMV_PREFETCH=B (bytes ahead, whatever the weight's size) changes no bit of the GEMV form (native
    AVX-512 only: the emulation has nothing to prefetch), distances past the panel's end included; a
    value that is not a multiple of 64 bytes from 0 to 1 MiB is refused, naming the variable."""
    if not _supported(cpu_ops, "avx512"):
        pytest.skip("this CPU cannot run avx512")
    monkeypatch.setenv("PTQRT_CPU_ISA", "avx512")
    k, n = 4100, 333
    x, w = rand_int8(m, k), rand_int8(n, k)
    expect = ref.int32_matmul(x, w)
    with _pack_budget(cpu_ops, 1 << 30):
        for ahead in ("", "0", "64", "8192", str(1 << 20)):
            monkeypatch.setenv("PTQRT_CPU_GEMV_PREFETCH", ahead)
            out = cpu_ops.w8a8_gemm(x, torch.ones(m), w, torch.ones(n), None, torch.int32)
            assert cpu_ops.last_w8a8_path() == "vnni-gemv"
            assert torch.equal(out, expect), ahead
        for bad in ("100", "-64", "8k", str(2 << 20)):
            monkeypatch.setenv("PTQRT_CPU_GEMV_PREFETCH", bad)
            with pytest.raises(RuntimeError, match="PTQRT_CPU_GEMV_PREFETCH must be"):
                cpu_ops.w8a8_gemm(x, torch.ones(m), w, torch.ones(n), None, torch.int32)


@pytest.mark.parametrize("scale_dtype", (torch.float16, torch.bfloat16, "strided"))
def test_w8a8_scales_any_float(cpu_ops, scale_dtype):
    """x_scale, w_scale and bias of another float dtype, or fp32 but not contiguous, are read as fp32
    values: the same result as with contiguous fp32 copies of them."""
    m, n, k = 5, 70, 64
    x, w = rand_int8(m, k), rand_int8(n, k)
    xs, ws, bias = rand_scale(m), rand_scale(n), torch.randn(n)
    if scale_dtype == "strided":
        xs2, ws2, b2 = (torch.stack([t, t], 1)[:, 0] for t in (xs, ws, bias))
        assert not xs2.is_contiguous()
    else:
        xs2, ws2, b2 = (t.to(scale_dtype) for t in (xs, ws, bias))
    got = cpu_ops.w8a8_gemm(x, xs2, w, ws2, b2, torch.float32)
    want = cpu_ops.w8a8_gemm(x, xs2.float().contiguous(), w, ws2.float().contiguous(), b2.float().contiguous(),
                             torch.float32)
    assert torch.equal(got, want)


@pytest.mark.parametrize("isa", ("avx512", "avx512-emulated"))
@pytest.mark.parametrize("m,n,k", ((1, 32, 64), (4, 100, 33), (16, 64, 4096), (17, 45, 333), (33, 17, 130),
                                   (5, 1, 9001), (131, 50, 65), (32, 96, 4111)))
def test_amx_tile_kernel(cpu_ops, monkeypatch, isa, m, n, k):
    """PTQRT_CPU_AMX=1: the VNNI path's calls on cached quads run the AMX-INT8 tile kernel (natively
    where the CPU and OS offer AMX, else emulated under avx512-emulated): exact against the reference
    and the same bits as the default kernels, epilogue included; one and two 16-row tiles, partial
    row tiles and 16-column halves, K tails (a zero-padded copy of the last 64-k block), blocks split
    over threads; -128 in both operands. Any value but '0' / '1' is refused, naming the variable."""
    if not _supported(cpu_ops, isa) or (isa == "avx512" and not cpu_ops.has_amx()):
        pytest.skip(f"this CPU (or its OS) cannot run {isa}" + (" with AMX tiles" if isa == "avx512" else ""))
    monkeypatch.setenv("PTQRT_CPU_ISA", isa)
    x, w = rand_int8(m, k), rand_int8(n, k)
    x[0, 0], x[-1, -1], w[0, 0], w[-1, -1] = -128, -128, -128, -128
    xs, ws, bias = rand_scale(m), rand_scale(n), torch.randn(n)
    outs = {}
    with _pack_budget(cpu_ops, 1 << 30):
        for switch in ("0", "1"):
            monkeypatch.setenv("PTQRT_CPU_AMX", switch)
            _dirty_heap(4 * m * n)
            outs[switch] = (cpu_ops.w8a8_gemm(x, xs, w, ws, None, torch.int32),
                            cpu_ops.w8a8_gemm(x, xs, w, ws, bias, torch.float32))
            assert cpu_ops.last_w8a8_path() == ("amx" if switch == "1" else "vnni-gemv" if m <= 6 else "vnni-panel")
        assert cpu_ops.pack_cache_info()[0] == 1
    assert torch.equal(outs["1"][0], ref.int32_matmul(x, w))
    assert torch.equal(outs["1"][0], outs["0"][0]) and torch.equal(outs["1"][1], outs["0"][1])
    for bad in ("2", "on", " 1"):
        monkeypatch.setenv("PTQRT_CPU_AMX", bad)
        with pytest.raises(RuntimeError, match="PTQRT_CPU_AMX"):
            cpu_ops.w8a8_gemm(x, xs, w, ws, None, torch.int32)


def test_amx_switch_on_other_paths(cpu_ops, monkeypatch):
    """PTQRT_CPU_AMX=1 acts on the VNNI path's cached quads only: on AVX2 and scalar paths and on VNNI
    calls without quads (the pack cache off) the usual kernels run, exact; a bad value is refused on
    every path; on a CPU whose best path is AVX-512 VNNI without AMX tiles the switch is an error,
    not a silent VNNI run."""
    x, w = rand_int8(3, 40), rand_int8(5, 40)
    for isa in ("scalar", "avx2", "avx512-emulated"):
        if not _supported(cpu_ops, isa):
            continue
        monkeypatch.setenv("PTQRT_CPU_ISA", isa)
        monkeypatch.setenv("PTQRT_CPU_AMX", "1")
        with _pack_budget(cpu_ops, 0):
            assert torch.equal(cpu_ops.w8a8_gemm(x, torch.ones(3), w, torch.ones(5), None, torch.int32),
                               ref.int32_matmul(x, w))
        assert cpu_ops.last_w8a8_path() == {"scalar": "scalar", "avx2": "avx2-dot", "avx512-emulated": "vnni-dot"}[isa]
        monkeypatch.setenv("PTQRT_CPU_AMX", "yes")
        with pytest.raises(RuntimeError, match="PTQRT_CPU_AMX"):
            cpu_ops.w8a8_gemm(x, torch.ones(3), w, torch.ones(5), None, torch.int32)
    monkeypatch.setenv("PTQRT_CPU_AMX", "1")
    if not _supported(cpu_ops, "avx512") or cpu_ops.has_amx():
        return
    monkeypatch.setenv("PTQRT_CPU_ISA", "avx512")
    with pytest.raises(RuntimeError, match="no AMX-INT8"):
        cpu_ops.w8a8_gemm(x, torch.ones(3), w, torch.ones(5), None, torch.int32)


@pytest.mark.parametrize("isa", ("avx512", "avx512-emulated"))
def test_amx_default(cpu_ops, monkeypatch, isa):
    """PTQRT_CPU_AMX unset: the tile kernel from 16 rows on a CPU with AMX (the VNNI kernels on the
    cached quads below 16 rows), never on one without it or under avx512-emulated; exact either way."""
    if not _supported(cpu_ops, isa):
        pytest.skip(f"this CPU cannot run {isa}")
    monkeypatch.setenv("PTQRT_CPU_ISA", isa)
    monkeypatch.delenv("PTQRT_CPU_AMX", raising=False)
    amx = isa == "avx512" and cpu_ops.has_amx()
    with _pack_budget(cpu_ops, 1 << 30):
        for m, path in ((15, "vnni-panel"), (16, "amx" if amx else "vnni-panel"), (40, "amx" if amx else "vnni-panel")):
            x, w = rand_int8(m, 300), rand_int8(70, 300)
            assert torch.equal(cpu_ops.w8a8_gemm(x, torch.ones(m), w, torch.ones(70), None, torch.int32),
                               ref.int32_matmul(x, w))
            assert cpu_ops.last_w8a8_path() == path, m


# ------------------------------------------------------------------- packed-weight cache (AVX2)
@contextlib.contextmanager
def _pack_budget(cpu_ops, nbytes: int):
    """The packed-weight cache's budget inside the block (setting it drops every entry)."""
    old = cpu_ops.pack_cache_set_budget(nbytes)
    try:
        yield
    finally:
        cpu_ops.pack_cache_set_budget(old)


@pytest.fixture
def avx2(cpu_ops, monkeypatch):
    if not _supported(cpu_ops, "avx2"):
        pytest.skip(f"this CPU has no avx2 (its best path is {cpu_ops.best_isa()})")
    monkeypatch.setenv("PTQRT_CPU_ISA", "avx2")


@pytest.fixture(params=("avx2", "avx512", "avx512-emulated"))
def panel_isa(request, cpu_ops, monkeypatch):
    """The paths with panel kernels (and a packed-weight cache)."""
    return _force(request, cpu_ops, monkeypatch)


@pytest.mark.parametrize("cached", (True, False))
@pytest.mark.parametrize("m,n,k", ((1, 100, 33), (1, 16, 1), (1, 7, 4111), (2, 85, 4111), (2, 200, 17), (2, 3, 2),
                                   (129, 70, 300), (130, 33, 65), (3, 17, 33), (4, 16, 1), (5, 1, 2), (7, 33, 3),
                                   (16, 15, 513), (17, 40, 4111), (23, 70, 200), (24, 37, 5000), (29, 16, 4096),
                                   (127, 33, 17), (131, 50, 2003), (16130, 5, 20)))
def test_w8a8_panels_cached_and_repacked(cpu_ops, panel_isa, cached, m, n, k):
    """The kernels on the cache's whole-weight copy or on per-call repacked chunks. AVX2: cached, the
    streaming GEMV for M <= 2 and for a last m-block of 1-2 rows (4 or 2 panels at a time, then one;
    16130 rows end in a block of 2) and the panel kernel from 3 rows; uncached, the panel kernel from
    24 rows (dot-product tiles below). VNNI: cached, the GEMV form for 1-6 rows and the panel kernel
    from 7; uncached, the panel kernel from 32 rows; the offset's correction precomputed over the
    whole K (cached) or per K chunk. Every row count of the last row group, partial panels, odd K,
    several K chunks, -128 in both operands."""
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    x[0, 0], w[0, 0], w[-1, -1] = -128, -128, -128
    with _pack_budget(cpu_ops, (1 << 30) if cached else 0):
        for _ in range(2):  # the first call packs (when cached), the second reads the copy
            _dirty_heap(4 * m * n)
            out = cpu_ops.w8a8_gemm(x, torch.ones(m), w, torch.ones(n), None, torch.int32)
            assert torch.equal(out, ref.int32_matmul(x, w))
        assert cpu_ops.pack_cache_info()[0] == int(cached)


def test_pack_cache_follows_the_weight(cpu_ops, avx2):
    """In-place writes repack, freed weights free their copy, a full budget or an inference tensor
    is simply not cached; every result stays exact."""
    m, n, k = 16, 40, 200
    x = rand_int8(m, k)

    def run(w):
        out = cpu_ops.w8a8_gemm(x, torch.ones(m), w, torch.ones(n), None, torch.int32)
        assert torch.equal(out, ref.int32_matmul(x, w))

    with _pack_budget(cpu_ops, 1 << 30):
        w = rand_int8(n, k)
        run(w)
        entries, held, _ = cpu_ops.pack_cache_info()
        assert entries == 1 and held >= n * k
        w.neg_()  # the same storage, a new version: the stale copy must not be used
        run(w)
        w[3:5].copy_(rand_int8(2, k))  # a write through a view bumps the same version counter
        run(w)
        w2 = w.clone()
        run(w2)
        assert cpu_ops.pack_cache_info()[0] == 2
        del w, w2
        assert cpu_ops.pack_cache_info()[:2] == [0, 0]
        with torch.inference_mode():
            wi = rand_int8(n, k)
        run(wi)
        assert cpu_ops.pack_cache_info()[0] == 0
    with _pack_budget(cpu_ops, n * k // 2):  # too small for the copy: runs uncached
        run(rand_int8(n, k))
        assert cpu_ops.pack_cache_info()[:2] == [0, 0]


def test_pack_cache_weight_and_view_at_one_address(cpu_ops, panel_isa):
    """A weight and a view of its leading rows (a fused QKV weight and its Q part) start at one
    address: each keeps its own copy (keyed by shape too) instead of evicting the other's."""
    m, n, k = 3, 48, 100
    x, w = rand_int8(m, k), rand_int8(n, k)
    head = w[:16]
    with _pack_budget(cpu_ops, 1 << 30):
        for _ in range(2):
            for t in (w, head):
                out = cpu_ops.w8a8_gemm(x, torch.ones(m), t, torch.ones(t.shape[0]), None, torch.int32)
                assert torch.equal(out, ref.int32_matmul(x, t))
            assert cpu_ops.pack_cache_info()[0] == 2


def test_pack_cache_write_during_first_pack(cpu_ops):
    """A weight written (version bumped) while another thread's first call is packing it: the copy
    is kept under the version read before packing, so the call after the write repacks."""
    import threading
    import time
    m, n, k = 1, 2048, 4096
    x, new = rand_int8(m, k), rand_int8(n, k)
    with _pack_budget(cpu_ops, 1 << 30):
        for trial in range(4):
            cpu_ops.pack_cache_clear()
            w = rand_int8(n, k)

            def writer():
                time.sleep(0.0005 * trial)
                with torch.no_grad():
                    w.copy_(new)

            t = threading.Thread(target=writer)
            t.start()
            cpu_ops.w8a8_gemm(x, torch.ones(m), w, torch.ones(n), None, torch.int32)  # packs (racing the write)
            t.join()
            out = cpu_ops.w8a8_gemm(x, torch.ones(m), w, torch.ones(n), None, torch.int32)
            assert torch.equal(out, ref.int32_matmul(x, new)), trial


def test_pack_weight_refreshes_after_untracked_writes(cpu_ops, panel_isa):
    """A write through .data bypasses the version counter, so calls keep the cached copy (documented);
    pack_weight (ptqrt.prepack) packs afresh, and the calls then see the new values."""
    m, n, k = 4, 40, 200
    x, w = rand_int8(m, k), rand_int8(n, k)
    with _pack_budget(cpu_ops, 1 << 30):
        assert torch.equal(cpu_ops.w8a8_gemm(x, torch.ones(m), w, torch.ones(n), None, torch.int32),
                           ref.int32_matmul(x, w))
        w.data.neg_()
        assert cpu_ops.pack_weight(w) and cpu_ops.pack_cache_info()[0] == 1
        assert torch.equal(cpu_ops.w8a8_gemm(x, torch.ones(m), w, torch.ones(n), None, torch.int32),
                           ref.int32_matmul(x, w))


def test_pack_weight_snapshots_inference_tensors(cpu_ops, panel_isa):
    """A call never caches an inference tensor (no version counter shows its in-place writes);
    pack_weight (ptqrt.prepack) packs one as a snapshot, which calls then use as is: a write inside
    inference mode shows once the weight is packed again (afresh on every pack_weight)."""
    m, n, k = 16, 40, 200
    x = rand_int8(m, k)

    def gemm(w):
        return cpu_ops.w8a8_gemm(x, torch.ones(m), w, torch.ones(n), None, torch.int32)

    with _pack_budget(cpu_ops, 1 << 30):
        with torch.inference_mode():
            w = rand_int8(n, k)
        assert torch.equal(gemm(w), ref.int32_matmul(x, w))
        assert cpu_ops.pack_cache_info()[0] == 0
        assert cpu_ops.pack_weight(w) and cpu_ops.pack_cache_info()[0] == 1
        assert torch.equal(gemm(w), ref.int32_matmul(x, w))
        before = w.clone()
        with torch.inference_mode():
            w.neg_()
        assert torch.equal(gemm(w), ref.int32_matmul(x, before))  # the snapshot, as documented
        assert cpu_ops.pack_weight(w) and cpu_ops.pack_cache_info()[0] == 1
        assert torch.equal(gemm(w), ref.int32_matmul(x, w))
        del w
        assert cpu_ops.pack_cache_info()[:2] == [0, 0]


@contextlib.contextmanager
def _isa_env(name: str):
    """PTQRT_CPU_ISA=name inside the block (hypothesis tests cannot take the monkeypatch fixture)."""
    old = os.environ.get("PTQRT_CPU_ISA")
    os.environ["PTQRT_CPU_ISA"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["PTQRT_CPU_ISA"]
        else:
            os.environ["PTQRT_CPU_ISA"] = old


@settings(max_examples=20, deadline=None)
@given(m=st.integers(0, 80), n=st.integers(1, 70), k=st.integers(0, 300),  # M >= 24 / 32: the panel kernels
       out_dtype=st.sampled_from(FLOATS + (torch.int32,)), isa_name=st.sampled_from(("scalar", "avx2", "avx512-emulated")))
def test_w8a8_property(cpu_ops, m, n, k, out_dtype, isa_name):
    if not _supported(cpu_ops, isa_name):
        return
    x, w, xs, ws = rand_int8(m, k), rand_int8(n, k), rand_scale(m), rand_scale(n)
    with _isa_env(isa_name):
        out = cpu_ops.w8a8_gemm(x, xs, w, ws, None, out_dtype)
    expect = ref.w8a8_gemm(x, xs, w, ws, None, out_dtype)
    if out_dtype == torch.int32:
        assert torch.equal(out, expect)
    else:
        assert_close_to_ref(out, expect)


# -------------------------------------------------------------------------------------- quantize
def _with_specials(x: torch.Tensor) -> torch.Tensor:
    """Row 0 holds a NaN, row 1 an inf, row 2 is all zeros (where the shape allows)."""
    x = x.clone()
    if x.shape[0] > 0 and x.shape[1] > 0:
        x[0, x.shape[1] // 2] = float("nan")
    if x.shape[0] > 1 and x.shape[1] > 0:
        x[1, 0] = float("inf")
    if x.shape[0] > 2:
        x[2] = 0
    return x


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,k", ((0, 8), (1, 47), (3, 100), (16, 17), (17, 130), (127, 33), (4, 0)))
@pytest.mark.parametrize("smooth_dtype", (None, torch.float32, torch.bfloat16))
def test_quantize_per_token_exact(cpu_ops, isa, dtype, m, k, smooth_dtype):
    x = _with_specials(torch.randn(m, k) * 4).to(dtype)
    smooth = None if smooth_dtype is None else (torch.rand(k) + 0.5).to(smooth_dtype)
    _dirty_heap(m * k)
    q, s = cpu_ops.quantize_per_token(x, smooth)
    rq, rs = ref.quantize_per_token(x, smooth)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q, rq)
    torch.testing.assert_close(s, rs, rtol=0, atol=0, equal_nan=True)
    if m > 0 and k > 0:
        assert torch.isnan(s[0]) and (q[0] == 0).all()  # a NaN token: NaN scale, zeros, alone


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,k", ((0, 8), (1, 47), (17, 130), (127, 33)))
@pytest.mark.parametrize("smooth", (False, True))
def test_quantize_per_tensor_exact(cpu_ops, isa, dtype, m, k, smooth):
    x = _with_specials(torch.randn(m, k)).to(dtype)
    sm = (torch.rand(k) + 0.5) if smooth else None
    for scale in (0.013, 1e-30, 0.0):  # 1e-30 saturates everything, 0 gives +-inf and NaN (0/0)
        sc = torch.tensor([scale])
        assert torch.equal(cpu_ops.quantize_per_tensor(x, sc, sm), ref.quantize_per_tensor(x, sc, sm))


def test_quantize_ties_round_half_even(cpu_ops, isa):
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, -127.5, 3.0] * 3])
    q = cpu_ops.quantize_per_tensor(x, torch.tensor([1.0]), None)
    assert q[0, :10].tolist() == [0, 2, 2, 0, -2, -2, 126, 127, -127, 3]
    assert torch.equal(q, ref.quantize_per_tensor(x, torch.tensor([1.0])))


@pytest.mark.parametrize("smooth", (False, True))
def test_quantize_near_ties_inexact_reciprocal(cpu_ops, isa, smooth):
    """x / s on, or an ulp either side of, every n + 1/2 for scales whose reciprocal is inexact: a
    multiply by 1 / s in place of the division flips some of them (checked: a version that divided
    only where x * (1 / s) fell within 2^-12 of n + 1/2 passed, one that never divided failed)."""
    k = 3 * 254
    sm = (torch.rand(k) + 0.5) if smooth else None
    for s in (0.1, 0.013, 3.7, 1 / 3, 7e-5, 1e-30):
        halves = (torch.arange(-127, 127, dtype=torch.float64) + 0.5).repeat(3)
        x = (halves * s * (sm.double() if smooth else 1)).float()
        x[254:508] = torch.nextafter(x[254:508], torch.tensor(float("inf")))
        x[508:] = torch.nextafter(x[508:], torch.tensor(float("-inf")))
        sc = torch.tensor([s], dtype=torch.float32)
        assert torch.equal(cpu_ops.quantize_per_tensor(x[None], sc, sm), ref.quantize_per_tensor(x[None], sc, sm))
        rows = torch.stack([x, torch.cat([x[:-1], torch.tensor([127 * s])])])  # the second's scale ~ s
        q, scale = cpu_ops.quantize_per_token(rows, sm)
        rq, rscale = ref.quantize_per_token(rows, sm)
        assert torch.equal(q, rq) and torch.equal(scale, rscale)


# ------------------------------------------------------------------------------------------ w8a16
def _check_w8a16(cpu_ops, dtype, m, n, k, group):
    x = torch.randn(m, k).to(dtype)
    w = rand_int8(n, k)
    ws = rand_scale(n * (k // group if group else 1)).reshape((n, k // group) if group else (n,))
    bias = torch.randn(n).to(dtype)
    _dirty_heap(4 * m * n)
    out = cpu_ops.w8a16_gemm(x, w, ws, bias, group)
    assert out.dtype == dtype and out.shape == (m, n)
    expect = ref.w8a16_gemm(x, w, ws, bias, group)
    # the same product done by torch in the low precision: its error bounds ours (at most twice)
    lowp = torch.nn.functional.linear(x, ref.dequantize_weight(w, ws, group).to(dtype), bias)
    assert_close_to_ref(out, expect, lowp if dtype != torch.float32 and m > 0 else None)


@pytest.fixture(params=ISAS)
def w8a16_isa(request, cpu_ops, monkeypatch):
    """The w8a16 paths: scalar, AVX2, AVX-512 and the emulation of its tiles and panels."""
    return _force(request, cpu_ops, monkeypatch)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m", (0,) + ODD_M)
@pytest.mark.parametrize("n,k,group", ((33, 47, 0), (72, 100, 25), (130, 96, 32), (9, 64, 1), (10, 256, 128),
                                       (20, 150, 50), (17, 37, 37)))
def test_w8a16(cpu_ops, w8a16_isa, dtype, m, n, k, group):
    """Groups shorter than, equal to and longer than a vector (1, 25, 32, 37, 50, 128), ragged K, one row
    against 1-8 columns and tiles of up to 4 rows x 3 columns."""
    _check_w8a16(cpu_ops, dtype, m, n, k, group)


def test_w8a16_avx512_matches_its_emulation(cpu_ops, monkeypatch):
    """On an AVX-512 CPU the native tiles and panels and their emulation give the same bits (same
    operations in the same order, fused multiply-adds both), per channel and per group, every dtype."""
    if not _supported(cpu_ops, "avx512"):
        pytest.skip("this CPU cannot run avx512")
    for dtype in FLOATS:
        for m, n, k, group in ((1, 37, 333, 0), (5, 20, 150, 50), (4, 9, 96, 32), (2, 8, 37, 37), (64, 40, 300, 0),
                               (70, 33, 200, 25)):
            x, w = torch.randn(m, k).to(dtype), rand_int8(n, k)
            ws = rand_scale(n * (k // group if group else 1)).reshape((n, k // group) if group else (n,))
            outs = []
            for isa in ("avx512", "avx512-emulated"):
                monkeypatch.setenv("PTQRT_CPU_ISA", isa)
                outs.append(cpu_ops.w8a16_gemm(x, w, ws, None, group))
                assert cpu_ops.last_w8a16_path() == ("avx512-panel" if m >= 64 else "avx512-tiles")
            assert torch.equal(outs[0], outs[1]), (dtype, m, n, k, group)


@pytest.mark.parametrize("isa", ("avx512", "avx512-emulated"))
def test_w8a16_avx512_switch(cpu_ops, monkeypatch, isa):
    """PTQRT_CPU_W8A16_AVX512=0 puts AVX-512 CPUs back on the AVX2 tiles and panels (same results
    within rounding; last_w8a16_path() says which ran); a value other than '0' / '1' is refused on
    every path, naming the variable."""
    if not _supported(cpu_ops, isa):
        pytest.skip(f"this CPU cannot run {isa}")
    monkeypatch.setenv("PTQRT_CPU_ISA", isa)
    x, w, ws = torch.randn(3, 200), rand_int8(21, 200), rand_scale(21 * 8).reshape(21, 8)
    expect = ref.w8a16_gemm(x, w, ws, None, 25)
    for switch in ("", "1", "0"):
        monkeypatch.setenv("PTQRT_CPU_W8A16_AVX512", switch)
        assert_close_to_ref(cpu_ops.w8a16_gemm(x, w, ws, None, 25), expect)
        # the emulation has no AVX2 side to go back to: its tiles are the AVX-512 ones
        back = switch == "0" and isa == "avx512"
        assert cpu_ops.last_w8a16_path() == ("avx2-tiles" if back else "avx512-tiles")
    x64 = torch.randn(64, 200)  # from 64 rows the panel kernels, 32 columns wide unless switched back
    for switch in ("1", "0"):
        monkeypatch.setenv("PTQRT_CPU_W8A16_AVX512", switch)
        assert_close_to_ref(cpu_ops.w8a16_gemm(x64, w, ws, None, 25), ref.w8a16_gemm(x64, w, ws, None, 25))
        back = switch == "0" and isa == "avx512"
        assert cpu_ops.last_w8a16_path() == ("avx2-panel" if back else "avx512-panel")
    monkeypatch.setenv("PTQRT_CPU_W8A16_AVX512", "yes")
    with pytest.raises(RuntimeError, match="PTQRT_CPU_W8A16_AVX512"):
        cpu_ops.w8a16_gemm(x, w, ws, None, 25)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,n,k,group", ((64, 40, 1104, 48), (131, 33, 1104, 0), (70, 16, 1000, 25), (64, 70, 600, 8),
                                         (200, 17, 513, 0), (301, 40, 48, 16)))
def test_w8a16_panels(cpu_ops, w8a16_isa, dtype, m, n, k, group):
    """From 64 rows the AVX2 path dequantizes 16 columns x one K chunk at a time into an fp32 panel
    (the AVX-512 one, and its emulation, 32 columns as two such panels): several K chunks (a chunk
    boundary inside a group), groups of 8 k at a time or one k at a time (a group size not a multiple
    of 8), partial panels (16, 17, 33, 40, 70 columns: a second 16-column half empty, partial or
    whole), two and three m-blocks (rows not a multiple of the 6-row groups)."""
    _check_w8a16(cpu_ops, dtype, m, n, k, group)


@settings(max_examples=15, deadline=None)
@given(m=st.integers(0, 20), n=st.integers(1, 40), kg=st.sampled_from(((48, 0), (50, 5), (96, 32), (7, 7), (100, 0))),
       dtype=st.sampled_from(FLOATS))
def test_w8a16_property(cpu_ops, m, n, kg, dtype):
    k, g = kg
    x, w = torch.randn(m, k).to(dtype), rand_int8(n, k)
    ws = rand_scale(n * (k // g if g else 1)).reshape((n, k // g) if g else (n,))
    out = cpu_ops.w8a16_gemm(x, w, ws, None, g)
    expect = ref.w8a16_gemm(x, w, ws, None, g)
    torch.testing.assert_close(out.float(), expect.float(), atol=0.05 if dtype != torch.float32 else 1e-4, rtol=0.02)


# -------------------------------------------------------------------------------- kv cache append
def _kv_scales(dynamic: bool, nb: int, bs: int, h: int, d: int):
    if dynamic:
        return torch.full((nb, bs, h), float("nan")), torch.full((nb, bs, h), float("nan"))
    return torch.rand(h, d) * 0.05 + 0.01, torch.rand(h, d) * 0.05 + 0.01


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("dynamic", (True, False))
@pytest.mark.parametrize("slot_dtype", (torch.int64, torch.int32))
@pytest.mark.parametrize("h,d", ((2, 20), (3, 64), (1, 7)))
def test_kv_cache_append_exact(cpu_ops, isa, dtype, dynamic, slot_dtype, h, d):
    nb, bs = 6, 4
    slots = torch.tensor([0, 5, -1, 9, 23, 12, 3], dtype=slot_dtype)
    k = (torch.randn(len(slots), h, d) * 2).to(dtype)
    v = torch.randn(len(slots), h, d).to(dtype)
    k[1, 0, 0] = float("nan")
    ks0, vs0 = _kv_scales(dynamic, nb, bs, h, d)
    results = []
    for impl in (ref.kv_cache_append, cpu_ops.kv_cache_append):
        kc = torch.full((nb, bs, h, d), -128, dtype=torch.int8)  # poison: unwritten slots must stay so
        vc = kc.clone()
        ks, vs = ks0.clone(), vs0.clone()
        impl(k, v, kc, vc, ks, vs, slots)
        results.append((kc, vc, ks, vs))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert (results[1][0].view(-1, h, d)[[1, 2, 4]] == -128).all()  # slots nobody wrote


def test_kv_cache_append_empty_and_bad_slot(cpu_ops):
    kc = torch.zeros(2, 4, 1, 8, dtype=torch.int8)
    vc, ks, vs = kc.clone(), torch.ones(2, 4, 1), torch.ones(2, 4, 1)
    cpu_ops.kv_cache_append(torch.randn(0, 1, 8), torch.randn(0, 1, 8), kc, vc, ks, vs, torch.zeros(0, dtype=torch.long))
    assert (kc == 0).all()
    with pytest.raises(ValueError, match="slots\\[1\\] = 8 is past"):
        cpu_ops.kv_cache_append(torch.randn(2, 1, 8), torch.randn(2, 1, 8), kc, vc, ks, vs, torch.tensor([0, 8]))
    with pytest.raises(RuntimeError, match="slots must be int64 or int32"):  # not truncated silently
        cpu_ops.kv_cache_append(torch.randn(2, 1, 8), torch.randn(2, 1, 8), kc, vc, ks, vs, torch.tensor([0.0, 1.5]))


def test_kv_ops_refuse_empty_blocks(cpu_ops):
    """block_size 0 (a division by zero in the block arithmetic) is refused, not a crash."""
    kc = rand_int8(2, 0, 1, 8)
    with pytest.raises(RuntimeError, match="needs block_size, Hkv and D >= 1"):
        cpu_ops.kv_cache_append(torch.randn(1, 1, 8), torch.randn(1, 1, 8), kc, kc.clone(), torch.ones(1, 8),
                                torch.ones(1, 8), torch.zeros(1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="needs block_size, Hkv and D >= 1"):
        cpu_ops.int8_kv_decode_attention(torch.randn(1, 1, 8), kc, kc.clone(), torch.ones(1, 8), torch.ones(1, 8),
                                         torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 0.5)


# ------------------------------------------------------------------------------ decode attention
def _paged(b, hq, hkv, d, bs, lens, dynamic, dtype, nb=48):
    kc, vc = rand_int8(nb, bs, hkv, d), rand_int8(nb, bs, hkv, d)
    if dynamic:
        ks, vs = torch.rand(nb, bs, hkv) * 0.05 + 1e-3, torch.rand(nb, bs, hkv) * 0.05 + 1e-3
    else:
        ks, vs = torch.rand(hkv, d) * 0.05 + 1e-3, torch.rand(hkv, d) * 0.05 + 1e-3
    maxb = max(math.ceil(n / bs) for n in lens) + 1
    bt = torch.stack([torch.randperm(nb)[:maxb] for _ in range(b)]).to(torch.int32)
    q = torch.randn(b, hq, d).to(dtype)
    return q, kc, vc, ks, vs, bt, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("dynamic", (True, False))
@pytest.mark.parametrize("b,hq,hkv,d,bs,lens", (
    (3, 4, 2, 20, 4, [0, 5, 13]),      # GQA 2, odd head dim, an empty sequence
    (2, 3, 3, 16, 16, [33, 1]),        # MHA, lengths across a block edge
    (2, 3, 3, 20, 4, [11, 6]),         # MHA, odd head dim, four-row groups cut short
    (1, 8, 1, 72, 8, [61]),            # MQA, 8 query heads on one kv head
    (2, 2, 1, 7, 5, [9, 17]),          # tiny head dim (vector tail only)
    (3, 4, 2, 32, 16, [300, 0, 77]),   # long enough to be split in chunks and combined
    (2, 6, 2, 44, 8, [45, 70]),        # GQA 3 (2 + 1 heads a tile), 32 + 8 + 4 channels, odd lengths
    (1, 7, 1, 24, 16, [129]),          # GQA 7 (4 + 2 + 1), head dim below one 32-channel tile
    (2, 8, 2, 20, 4, [37, 70]),        # GQA 4, 16 + 4 channels (a partial slice in the 4-head tile)
))
def test_decode_attention(cpu_ops, isa, dtype, dynamic, b, hq, hkv, d, bs, lens):
    args = _paged(b, hq, hkv, d, bs, lens, dynamic, dtype)
    sm = d ** -0.5
    out = cpu_ops.int8_kv_decode_attention(*args, sm)
    expect = ref.int8_kv_decode_attention(*args, sm)
    assert out.dtype == dtype and out.shape == args[0].shape
    assert_close_to_ref(out, expect)
    for i, n in enumerate(lens):
        if n == 0:
            assert (out[i] == 0).all()


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), hkv=st.integers(1, 3), g=st.integers(1, 9), d=st.integers(1, 80),
       bs=st.sampled_from((1, 4, 16)), lens=st.lists(st.integers(0, 150), min_size=3, max_size=3),
       dynamic=st.booleans(), isa_name=st.sampled_from(("scalar", "avx2")), seed=st.integers(0, 2**31 - 1))
def test_decode_attention_property(cpu_ops, b, hkv, g, d, bs, lens, dynamic, isa_name, seed):
    """Any group size (the AVX2 tiles of 4, 2 and 1 query heads), head dim (full and partial 8- and
    32-channel slices), block size and lengths (empty, odd, several chunks and 32-position blocks)."""
    if not _supported(cpu_ops, isa_name):
        return
    torch.manual_seed(seed)  # the data too comes from the example: a failure replays
    lens = lens[:b]
    args = _paged(b, hkv * g, hkv, d, bs, lens, dynamic, torch.float32, nb=b * (150 // bs + 2))
    sm = d ** -0.5
    with _isa_env(isa_name):
        out = cpu_ops.int8_kv_decode_attention(*args, sm)
    assert_close_to_ref(out, ref.int8_kv_decode_attention(*args, sm))


def test_decode_attention_refuses_bad_block(cpu_ops):
    q, kc, vc, ks, vs, bt, sl = _paged(1, 2, 2, 16, 4, [9], True, torch.float32)
    bt[0, 1] = 999
    with pytest.raises(ValueError, match="block_table\\[0\\]\\[1\\] = 999"):
        cpu_ops.int8_kv_decode_attention(q, kc, vc, ks, vs, bt, sl, 0.25)
    sl[0] = 10_000
    with pytest.raises(ValueError, match="seq_lens\\[0\\]"):
        cpu_ops.int8_kv_decode_attention(q, kc, vc, ks, vs, bt, sl, 0.25)


# ------------------------------------------------------------------------------ ISA selection
def test_isa_env_is_checked(cpu_ops, monkeypatch):
    monkeypatch.setenv("PTQRT_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="PTQRT_CPU_ISA must be one of"):
        cpu_ops.active_isa()
    monkeypatch.setenv("PTQRT_CPU_ISA", "auto")
    assert cpu_ops.active_isa() == cpu_ops.best_isa()
    if cpu_ops.best_isa() != "avx512":
        monkeypatch.setenv("PTQRT_CPU_ISA", "avx512")
        with pytest.raises(RuntimeError, match="cannot run"):
            cpu_ops.w8a8_gemm(rand_int8(1, 8), torch.ones(1), rand_int8(1, 8), torch.ones(1), None, torch.int32)


def test_avx_code_only_in_target_functions(cpu_ops):
    """No VEX/EVEX instruction outside the functions compiled for AVX2/AVX-512 (named *_avx2, *_avx512
    or in vnni_native): everything else, reached before the cpuid check, must run on any x86-64."""
    import re
    import shutil
    import subprocess

    lib = _library()
    if shutil.which("objdump") is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs objdump and an x86-64 build")
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", lib], capture_output=True, text=True,
                         check=True).stdout
    func, offenders = None, set()
    for line in dis.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            func = head.group(1)
            continue
        parts = line.split("\t")
        if func and len(parts) >= 2 and re.match(r"^(v|k)[a-z]", parts[-1].strip()):
            if not re.search(r"_avx2|_avx512|vnni_native::", func):
                offenders.add(func)
        # AMX tile instructions only in the tile kernel (reached only where has_amx())
        if func and len(parts) >= 2 and re.match(r"^(tdp|tile|ldtilecfg|sttilecfg)", parts[-1].strip()):
            if not re.search(r"amx_native::|AmxNative::", func):
                offenders.add(func)
    assert not offenders, f"AVX or AMX instructions in baseline functions: {sorted(offenders)[:5]}"
    assert "vpdpbusd" in dis and "vpmaddwd" in dis  # the VNNI and AVX2 kernels are really in there
    # and the AMX one, where the compiler builds it (isa.h: PTQRT_AMX_NATIVE)
    assert "amx_native::" not in dis or ("tdpbssd" in dis and "ldtilecfg" in dis)


def test_pack_cache_budget_from_environment(cpu_ops):
    """PTQRT_CPU_PACK_MB sets the budget (read once per process); a malformed value is refused loudly."""
    import subprocess
    import sys
    code = (f"import torch; torch.ops.load_library({_library()!r}); x = torch.ones(4, 8, dtype=torch.int8); "
            "torch.ops.ptqrt_cpu.w8a8_gemm(x, torch.ones(4), x, torch.ones(4), None, torch.int32); "
            "print(torch.ops.ptqrt_cpu.pack_cache_info())")
    env = dict(os.environ, PTQRT_CPU_PACK_MB="12")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1].endswith(f", {12 << 20}]")
    for bad in ("12MB", str(1 << 43), "99999999999999999999"):  # not a number; past int64 once in bytes
        env["PTQRT_CPU_PACK_MB"] = bad
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode != 0 and "PTQRT_CPU_PACK_MB must be a whole number of MiB" in run.stderr, bad


def test_pack_cache_threads(cpu_ops, panel_isa):
    """Python threads calling with their own and with shared weights at once (first calls pack under
    the cache's lock while others read): every result exact."""
    import threading
    shared = [rand_int8(48, 300) for _ in range(3)]
    errors = []

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        for i in range(6):
            w = shared[i % 3] if i % 2 else torch.randint(-128, 128, (40 + seed, 300), dtype=torch.int8, generator=g)
            m = (1, 2, 5, 16)[(i + seed) % 4]
            x = torch.randint(-128, 128, (m, 300), dtype=torch.int8, generator=g)
            out = cpu_ops.w8a8_gemm(x, torch.ones(m), w, torch.ones(w.shape[0]), None, torch.int32)
            if not torch.equal(out, ref.int32_matmul(x, w)):
                errors.append((seed, i))

    with _pack_budget(cpu_ops, 1 << 30):
        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


def test_prepack_model(cpu_ops):
    """ptqrt.prepack packs a quantized model's W8A8 weights at load time (the same copies the first
    calls would make, so the outputs do not change), and nothing where the cpu backend does not run them."""
    import ptqrt
    from models import tiny_net

    if cpu_ops.best_isa() == "scalar":
        pytest.skip("the scalar path packs nothing")
    ids = torch.randint(0, 37, (2, 9))
    with _pack_budget(cpu_ops, 1 << 30):
        model = ptqrt.quantize(tiny_net(), ptqrt.PTQConfig(act_dtype="int8"), calib_data=None)
        n_w8a8 = sum(isinstance(m, ptqrt.QuantLinear) and m.mode != "W8A16" for m in model.modules())
        assert n_w8a8 == 4
        with torch.no_grad():
            before = model(ids)
        ptqrt.set_backend("reference")
        assert ptqrt.prepack(model) == 0
        ptqrt.set_backend("auto")
        cpu_ops.pack_cache_clear()
        assert ptqrt.prepack(model) == n_w8a8
        assert cpu_ops.pack_cache_info()[0] == n_w8a8
        with torch.no_grad():
            assert torch.equal(model(ids), before)
        assert cpu_ops.pack_cache_info()[0] == n_w8a8  # the calls used the prepacked copies
        with torch.inference_mode():  # weights made as inference tensors: calls alone never cache them
            model_i = ptqrt.quantize(tiny_net(), ptqrt.PTQConfig(act_dtype="int8"), calib_data=None)
            before_i = model_i(ids)
        cpu_ops.pack_cache_clear()
        assert ptqrt.prepack(model_i) == n_w8a8
        with torch.inference_mode():
            assert torch.equal(model_i(ids), before_i)
    with _pack_budget(cpu_ops, 0):
        assert ptqrt.prepack(model) == 0
    with pytest.raises(RuntimeError, match="contiguous 2-D int8 CPU tensor"):
        cpu_ops.pack_weight(torch.zeros(4, 4))


# ------------------------------------------------------------------------- the public ops path
@pytest.mark.parametrize("backend", ("cpu", "auto"))
def test_public_ops_use_cpu_backend(cpu_ops, backend):
    pops.set_backend(backend)
    m, n, k = 3, 33, 47
    x = torch.randn(m, k)
    for op in pops.OP_NAMES:
        assert pops.backend_for(op, "cpu", m) == "cpu", op
    x_q, x_s = pops.quantize_per_token(x)
    assert torch.equal(x_q, ref.quantize_per_token(x)[0])
    w = rand_int8(n, k)
    ws = rand_scale(n)
    assert torch.equal(pops.w8a8_gemm(x_q, x_s, w, ws, None, torch.int32), ref.int32_matmul(x_q, w))
    assert_close_to_ref(pops.w8a16_gemm(x, w, ws, None, 0), ref.w8a16_gemm(x, w, ws, None, 0))
    assert torch.equal(pops.quantize_per_tensor(x, torch.tensor([0.02])), ref.quantize_per_tensor(x, torch.tensor([0.02])))
    q, kc, vc, ks, vs, bt, sl = _paged(2, 4, 2, 16, 4, [5, 9], True, torch.float32)
    assert_close_to_ref(pops.int8_kv_decode_attention(q, kc, vc, ks, vs, bt, sl, 0.25),
                        ref.int8_kv_decode_attention(q, kc, vc, ks, vs, bt, sl, 0.25))
    new_k, new_v, slots = torch.randn(2, 2, 16), torch.randn(2, 2, 16), torch.tensor([3, 17])
    expect = [t.clone() for t in (kc, vc, ks, vs)]
    ref.kv_cache_append(new_k, new_v, *expect, slots)
    pops.kv_cache_append(new_k, new_v, kc, vc, ks, vs, slots)  # in place
    for got, want in zip((kc, vc, ks, vs), expect):
        assert torch.equal(got, want)


@pytest.mark.parametrize("op", ("quantize_per_token", "w8a8_gemm", "w8a16_gemm", "kv_cache_append",
                                "int8_kv_decode_attention", "quantize_per_tensor"))
def test_opcheck_with_cpu_backend(cpu_ops, op):
    pops.set_backend("cpu")
    x, w = torch.randn(3, 40), rand_int8(5, 40)
    q, kc, vc, ks, vs, bt, sl = _paged(2, 4, 2, 16, 4, [5, 9], True, torch.float32)
    args = {
        "quantize_per_token": (x, torch.rand(40) + 0.5),
        "quantize_per_tensor": (x, torch.tensor([0.02]), None),
        "w8a8_gemm": (rand_int8(3, 40), rand_scale(3), w, rand_scale(5), torch.randn(5), torch.float32),
        "w8a16_gemm": (x, w, rand_scale(5 * 4).reshape(5, 4), None, 10),
        "kv_cache_append": (torch.randn(2, 2, 16), torch.randn(2, 2, 16), kc, vc, ks, vs, torch.tensor([1, 6])),
        "int8_kv_decode_attention": (q, kc, vc, ks, vs, bt, sl, 0.25),
    }[op]
    torch.library.opcheck(getattr(torch.ops.ptqrt, op).default, args)
