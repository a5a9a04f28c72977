"""The triton backend (kernels/, installed as ptqrt.kernels) against ptqrt.reference.

On the CPU (CI) conftest sets TRITON_INTERPRET=1: set_backend("triton") then runs the real Triton
kernels on CPU tensors through the interpreter, one fixed config each, on small odd shapes. With a
GPU, ``pytest -m gpu tests/test_triton_backend.py`` runs the same checks at real sizes (default
configs), the autotuned path, every autotune config once, and a CUDA-graph replay. The test marked
slow builds each kernel for sm_90 with Triton's own ptxas (no GPU needed), which catches what the
interpreter cannot (tl.dot tile minimums, int8 MMA operand layouts, shared memory per config);
``python -m ptqrt.kernels.compile_check --all`` does so for every config on sm_80 and sm_90.

Outputs the kernels allocate are poisoned (NaN / INT_MIN) through ``_common.alloc``; in-place
caches start from random bytes and are compared whole, so a stray or missing write shows.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from util import ODD_M, ODD_NK, TOL, poison_like, rand_int8, rand_scale

from ptqrt import ops
from ptqrt import reference as ref

ROOT = Path(__file__).resolve().parents[1]
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
cpu_only = pytest.mark.skipif(not INTERP, reason="CPU runs of the Triton kernels need TRITON_INTERPRET=1")

_MAP_KERNELS = f"""
import importlib.util, sys
import ptqrt
spec = importlib.util.spec_from_file_location("ptqrt.kernels", {str(ROOT / 'kernels' / '__init__.py')!r},
                                              submodule_search_locations=[{str(ROOT / 'kernels')!r}])
mod = importlib.util.module_from_spec(spec)
sys.modules["ptqrt.kernels"] = mod
spec.loader.exec_module(mod)
ptqrt.kernels = mod
"""


def _kernels():
    """ptqrt.kernels, mapped from the source folder when the checkout is not pip-installed (kernels/
    becomes ptqrt.kernels only through setup.py's package_dir)."""
    try:
        return importlib.import_module("ptqrt.kernels")
    except ImportError:
        exec(_MAP_KERNELS, {})
        return importlib.import_module("ptqrt.kernels")


K = _kernels()
_common = importlib.import_module("ptqrt.kernels._common")
w8a8_mod = importlib.import_module("ptqrt.kernels.w8a8_gemm")
w8a16_mod = importlib.import_module("ptqrt.kernels.w8a16_gemm")
kv_mod = importlib.import_module("ptqrt.kernels.kv_cache")
quant_mod = importlib.import_module("ptqrt.kernels.quantize")


@pytest.fixture(autouse=True)
def _triton_poisoned(monkeypatch):
    """Force the triton backend and poison every output the kernels allocate."""
    ops.set_backend("triton")
    monkeypatch.setattr(_common, "alloc", lambda shape, dtype, device: poison_like(torch.empty(shape, dtype=dtype,
                                                                                                 device=device)))
    yield


def _uses_triton(op: str, device, m: int = 1) -> None:
    # Without this a broken import would fall back to the reference and every comparison would pass.
    assert ops.backend_for(op, device, m) == "triton", f"{op} did not dispatch to triton"


def _rand(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, device=device) * scale).to(dtype)


def _lowp_tol(out, r, lowp):
    """assert_close_to_ref with the low-precision reference: at most 2x its error (or the dtype's
    tolerance), relative to the output's magnitude for large outputs."""
    big = max(1.0, r.float().abs().max().item())
    atol, rtol = TOL[out.dtype]
    err_ref = (lowp.float() - r.float()).abs().max().item()
    torch.testing.assert_close(out.float(), r.float(), atol=max(atol * big, 2 * err_ref), rtol=rtol)


# ------------------------------------------------------------------------------------------ quantize
def check_quantize_per_token(m, k, dtype, smooth, device):
    _uses_triton("quantize_per_token", device, m)
    x = _rand((m, k), dtype, device, 3.0)
    sm = (torch.rand(k, device=device) + 0.5).to(dtype) if smooth else None
    q, s = ops.quantize_per_token(x, sm)
    q_ref, s_ref = ref.quantize_per_token(x, sm)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q, q_ref), f"codes differ at {(q != q_ref).nonzero()[:5].tolist()}"
    assert torch.equal(s, s_ref)


def check_quantize_per_tensor(m, k, dtype, smooth, device):
    _uses_triton("quantize_per_tensor", device, m)
    x = _rand((m, k), dtype, device, 3.0)
    sm = (torch.rand(k, device=device) + 0.5).to(dtype) if smooth else None
    scale = torch.tensor([0.037], device=device)
    q = ops.quantize_per_tensor(x, scale, sm)
    assert torch.equal(q, ref.quantize_per_tensor(x, scale, sm))


QUANT_SHAPES = list(zip(ODD_M, (33, 47, 100, 17, 130, 72)))


@cpu_only
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,k", QUANT_SHAPES)
def test_quantize_per_token(m, k, dtype):
    check_quantize_per_token(m, k, dtype, smooth=(m % 2 == 1), device="cpu")


@cpu_only
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,k", QUANT_SHAPES[::2])
def test_quantize_per_tensor(m, k, dtype):
    check_quantize_per_tensor(m, k, dtype, smooth=(k % 2 == 0), device="cpu")


@cpu_only
def test_quantize_per_token_two_pass(monkeypatch):
    """Rows too wide for registers take two passes over x; shrink the limits to run that path."""
    monkeypatch.setattr(quant_mod, "_ONE_PASS_MAX_K", 16)
    monkeypatch.setattr(quant_mod, "_TWO_PASS_BLOCK_K", 32)
    for smooth in (False, True):
        check_quantize_per_token(5, 100, torch.float16, smooth, "cpu")
    x = _rand((3, 70), torch.float32, "cpu")
    x[1, 65] = float("nan")  # in the last chunk: the NaN must still reach the row's scale
    q, s = ops.quantize_per_token(x)
    q_ref, s_ref = ref.quantize_per_token(x)
    assert torch.equal(q, q_ref) and torch.equal(s.isnan(), s_ref.isnan()) and s[1].isnan()


@cpu_only
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy doing inf/inf
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_rounding_and_special_values(dtype):
    """Ties round to even, NaN -> 0 with a NaN scale, Inf rows, all-zero rows (scale 1), -0."""
    x = torch.zeros(5, 12, dtype=torch.float32)
    # scale = 127 / 127 = 1 exactly, so v / s are the ties themselves
    x[0] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5, 4.5, -0.0])
    x[1] = torch.randn(12)
    x[1, 3] = float("nan")
    x[2] = torch.randn(12)
    x[2, 5] = float("inf")
    x[4] = torch.randn(12) * 1e-3  # row 3 stays all zeros
    x = x.to(dtype)
    q, s = ops.quantize_per_token(x)
    q_ref, s_ref = ref.quantize_per_token(x)
    assert torch.equal(q, q_ref)
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -2, 4, 126, -126, 4, 0]
    assert torch.equal(s.isnan(), s_ref.isnan()) and s[1].isnan()
    assert torch.equal(s[~s.isnan()], s_ref[~s_ref.isnan()]) and s[3] == 1.0
    for scale in (1.0, 1e-30):  # 1e-30: every code saturates at +-127, NaN still 0
        st = torch.tensor([scale])
        assert torch.equal(ops.quantize_per_tensor(x, st), ref.quantize_per_tensor(x, st))


@cpu_only
def test_quantize_empty():
    q, s = ops.quantize_per_token(torch.randn(0, 40))
    assert q.shape == (0, 40) and s.shape == (0,)
    q, s = ops.quantize_per_token(torch.randn(3, 0))
    assert q.shape == (3, 0) and torch.equal(s, torch.ones(3))
    assert ops.quantize_per_tensor(torch.randn(0, 8), torch.tensor([0.1])).shape == (0, 8)


# ------------------------------------------------------------------------------------------ w8a8_gemm
def check_w8a8(m, n, k, out_dtype, per_token, bias_dtype, device, repeat=1):
    _uses_triton("w8a8_gemm", device, m)
    x_q, w_q = rand_int8(m, k, device=device), rand_int8(n, k, device=device)
    x_scale = rand_scale(m if per_token else 1, device=device)
    w_scale = rand_scale(n, device=device)
    bias = None if bias_dtype is None or out_dtype == torch.int32 else _rand((n,), bias_dtype, device)
    expect = ref.w8a8_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    for _ in range(repeat):  # a second call finds the split-K counters reset
        y = ops.w8a8_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype)
        assert y.dtype == out_dtype and y.shape == (m, n)
        # int32: the exact accumulator. Floats: the epilogue is compiled without FMA contraction, so
        # it rounds exactly as the reference does.
        assert torch.equal(y, expect), f"max diff {(y.double() - expect.double()).abs().max()}"


W8A8_OUT = (torch.float16, torch.bfloat16, torch.float32, torch.int32)


@cpu_only
@pytest.mark.parametrize("m", ODD_M + (40,))
@pytest.mark.parametrize("n,k", ODD_NK)
def test_w8a8_gemm(m, n, k):
    i = ODD_M.index(m) if m in ODD_M else 6
    out = W8A8_OUT[(i + n) % 4]
    check_w8a8(m, n, k, out, per_token=bool(i % 2), bias_dtype=FLOATS[(i + k) % 3] if i % 3 else None, device="cpu")


@cpu_only
@pytest.mark.parametrize("out_dtype", W8A8_OUT)
@pytest.mark.parametrize("m", (3, 33))
def test_w8a8_gemm_out_dtypes(m, out_dtype):
    check_w8a8(m, 72, 100, out_dtype, per_token=True, bias_dtype=torch.bfloat16, device="cpu")


@cpu_only
@pytest.mark.parametrize("split", (3, 8))
@pytest.mark.parametrize("out_dtype", (torch.int32, torch.float16))
def test_w8a8_gemv_split_k(monkeypatch, split, out_dtype):
    """M <= 16 with K split: partial tiles summed by the last split; counters reset for the next call."""
    monkeypatch.setitem(w8a8_mod.INTERPRET, "gemv", dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=split))
    check_w8a8(5, 40, 200, out_dtype, per_token=True, bias_dtype=torch.float32, device="cpu", repeat=2)
    counters = _common.tile_counters(torch.device("cpu"), 1)
    assert int(counters.abs().sum()) == 0, "split-K left a tile counter set"


def _tma_on(monkeypatch) -> list:
    """PTQRT_TRITON_TMA=1, and the (M, N, K) of every call that took the TMA kernel, in a list."""
    monkeypatch.setenv("PTQRT_TRITON_TMA", "1")
    calls = []
    real = w8a8_mod._launch_tma
    monkeypatch.setattr(w8a8_mod, "_launch_tma", lambda *a: calls.append(a[6:9]) or real(*a))
    return calls


@cpu_only
@pytest.mark.parametrize("out_dtype", W8A8_OUT)
def test_w8a8_gemm_tma(monkeypatch, out_dtype):
    """PTQRT_TRITON_TMA=1: the persistent TMA kernel (4 programs under the interpreter) over more tiles
    than programs, M / N / K tails inside the descriptors' boxes (zero-filled), per-token and per-tensor
    scales, bias; calls it does not take (K % 16 != 0; fp32 and int32 outputs) use the pointer kernel."""
    calls = _tma_on(monkeypatch)
    cases = [(17, 72, 112, True, torch.float32), (40, 130, 48, False, None), (127, 33, 208, True, torch.bfloat16),
             (70, 200, 16, True, torch.float16), (33, 40, 100, True, None)]
    for m, n, k, per_token, bias in cases:
        check_w8a8(m, n, k, out_dtype, per_token=per_token, bias_dtype=bias, device="cpu")
    half = out_dtype in (torch.float16, torch.bfloat16)
    assert calls == [(m, n, k) for m, n, k, *_ in cases if k % 16 == 0 and half]


def test_w8a8_gemm_tma_default(monkeypatch):
    """The TMA kernel's gate: on an sm_90 GPU from TMA_MIN_M rows by default (other GPUs and the
    interpreter never by default), everywhere with PTQRT_TRITON_TMA=1, nowhere with =0; any other value
    is refused."""
    monkeypatch.delenv("PTQRT_TRITON_TMA", raising=False)
    lo = w8a8_mod.TMA_MIN_M
    assert w8a8_mod.tma_enabled(lo, True) and not w8a8_mod.tma_enabled(lo - 1, True)
    assert not w8a8_mod.tma_enabled(lo, False)
    monkeypatch.setenv("PTQRT_TRITON_TMA", "1")
    assert w8a8_mod.tma_enabled(17, False) and w8a8_mod.tma_enabled(17, True)
    monkeypatch.setenv("PTQRT_TRITON_TMA", "0")
    assert not w8a8_mod.tma_enabled(lo, True)
    monkeypatch.setenv("PTQRT_TRITON_TMA", "yes")
    with pytest.raises(ValueError, match="PTQRT_TRITON_TMA"):
        w8a8_mod.tma_enabled(lo, True)


@cpu_only
@pytest.mark.parametrize("m", (3, 33))  # the GEMV and the GEMM kernels
def test_w8a8_gemm_bf16_keeps_nan(m):
    """cast_out's bf16 rounding keeps every NaN a NaN: 0x7FFFFFFF (the NaN a GPU's fp32 arithmetic
    makes) and 0xFFFFFFFF would carry into the sign bit and come out as -0.0 and +0.0."""
    _uses_triton("w8a8_gemm", "cpu", m)
    x_q, w_q = rand_int8(m, 40), rand_int8(8, 40)
    xs = torch.full((m,), 0.01)
    xs[1:3] = torch.tensor([0x7FFFFFFF, -1], dtype=torch.int32).view(torch.float32)
    y = ops.w8a8_gemm(x_q, xs, w_q, torch.full((8,), 0.02), None, torch.bfloat16)
    assert y[1:3].isnan().all() and not y[[0] + list(range(3, m))].isnan().any()


@cpu_only
def test_w8a8_gemm_empty_and_k0():
    y = ops.w8a8_gemm(rand_int8(0, 16), torch.ones(1), rand_int8(8, 16), torch.ones(8), None, torch.float16)
    assert y.shape == (0, 8)
    check_w8a8(3, 8, 0, torch.float32, True, torch.float32, "cpu")


# ------------------------------------------------------------------------------------------ w8a16_gemm
def check_w8a16(m, n, k, g, dtype, bias, device):
    _uses_triton("w8a16_gemm", device, m)
    x = _rand((m, k), dtype, device)
    w_q = rand_int8(n, k, device=device)
    w_scale = rand_scale(n, device=device) if g == 0 else rand_scale(n * (k // g), device=device).reshape(n, k // g)
    b = _rand((n,), dtype, device) if bias else None
    y = ops.w8a16_gemm(x, w_q, w_scale, b, g)
    assert y.dtype == dtype and y.shape == (m, n)
    r = ref.w8a16_gemm(x.float(), w_q, w_scale, None if b is None else b.float(), g)
    # The same math with the dequantized weight and the output rounded to x's dtype.
    w_lowp = ref.dequantize_weight(w_q, w_scale, g).to(dtype).float()
    lowp = (x.float() @ w_lowp.T + (0 if b is None else b.float())).to(dtype)
    _lowp_tol(y, r, lowp)


# (M, N, K, group): per channel, group = BLOCK_K under the interpreter (mode 1), a power of two
# below it and odd groups (mode 2: gathered scales), a group spanning K.
W8A16_CASES = [(1, 33, 48, 0), (2, 72, 96, 32), (3, 40, 64, 16), (16, 24, 96, 48), (17, 130, 17, 0),
               (127, 72, 100, 0), (40, 33, 128, 64), (5, 24, 96, 3)]


@cpu_only
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,n,k,g", W8A16_CASES)
def test_w8a16_gemm(m, n, k, g, dtype):
    check_w8a16(m, n, k, g, dtype, bias=(m + n) % 2 == 0, device="cpu")


@cpu_only
@pytest.mark.parametrize("g", (0, 32, 40))
def test_w8a16_gemv_split_k(monkeypatch, g):
    monkeypatch.setitem(w8a16_mod.INTERPRET, "gemv", dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=3))
    for _ in range(2):
        check_w8a16(4, 40, 160, g, torch.float16, bias=True, device="cpu")
    assert int(_common.tile_counters(torch.device("cpu"), 1).abs().sum()) == 0


@cpu_only
def test_w8a16_gemm_empty():
    y = ops.w8a16_gemm(torch.randn(0, 32), rand_int8(8, 32), rand_scale(8), None, 0)
    assert y.shape == (0, 8)


# ------------------------------------------------------------------------------------------ KV cache
def _cache(nb, bs, h, d, dynamic, device):
    kc, vc = rand_int8(nb, bs, h, d, device=device), rand_int8(nb, bs, h, d, device=device)
    shape = (nb, bs, h) if dynamic else (h, d)
    return kc, vc, rand_scale(shape, device=device), rand_scale(shape, device=device)


def check_kv_cache_append(t, nb, bs, h, d, k_dyn, v_dyn, dtype, device):
    _uses_triton("kv_cache_append", device, t)
    k, v = _rand((t, h, d), dtype, device, 2.0), _rand((t, h, d), dtype, device, 2.0)
    if t > 2:
        k[1, 0, 0] = float("nan")
    kc, vc, ks, _ = _cache(nb, bs, h, d, k_dyn, device)
    _, _, _, vs = _cache(nb, bs, h, d, v_dyn, device)
    slots = torch.randperm(nb * bs, device=device)[:t]
    slots[::3] = -1  # padding: skipped
    mine = [a.clone() for a in (kc, vc, ks, vs)]
    theirs = [a.clone() for a in (kc, vc, ks, vs)]
    ops.kv_cache_append(k, v, *mine, slots)
    ref.kv_cache_append(k, v, *theirs, slots)
    for name, a, b in zip(("k_cache", "v_cache", "k_scale", "v_scale"), mine, theirs):
        assert torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, equal_nan=True, rtol=0, atol=0)), \
            f"{name} differs at {(a != b).nonzero()[:5].tolist()}"


@cpu_only
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k_dyn,v_dyn", ((True, True), (False, False), (True, False)))
def test_kv_cache_append(dtype, k_dyn, v_dyn):
    check_kv_cache_append(7, 9, 4, 3, 20, k_dyn, v_dyn, dtype, "cpu")


@cpu_only
def test_kv_cache_append_empty_and_out_of_range():
    kc, vc, ks, vs = _cache(4, 4, 2, 16, True, "cpu")
    before = [a.clone() for a in (kc, vc, ks, vs)]
    ops.kv_cache_append(torch.randn(0, 2, 16), torch.randn(0, 2, 16), kc, vc, ks, vs, torch.zeros(0, dtype=torch.int64))
    # Slots past the cache's end are dropped rather than written out of bounds.
    K.kv_cache_append(torch.randn(2, 2, 16), torch.randn(2, 2, 16), kc, vc, ks, vs, torch.tensor([16, -3]))
    for a, b in zip((kc, vc, ks, vs), before):
        assert torch.equal(a, b)


def check_decode(b, hq, hkv, d, nb, bs, lens, dynamic, dtype, device):
    _uses_triton("int8_kv_decode_attention", device, b)
    kc, vc, ks, vs = _cache(nb, bs, hkv, d, dynamic, device)
    max_blocks = max(1, -(-max(lens) // bs))
    block_table = torch.randperm(nb, device=device)[: b * max_blocks].reshape(b, max_blocks).to(torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = _rand((b, hq, d), dtype, device)
    sm_scale = 1.0 / d ** 0.5
    out = ops.int8_kv_decode_attention(q, kc, vc, ks, vs, block_table, seq_lens, sm_scale)
    assert out.dtype == dtype and out.shape == (b, hq, d)
    r = ref.int8_kv_decode_attention(q.float(), kc, vc, ks, vs, block_table, seq_lens, sm_scale)
    # Low-precision peer: the same attention with probabilities rounded to q's dtype, output rounded.
    lowp = ref.int8_kv_decode_attention(q, kc, vc, ks, vs, block_table, seq_lens, sm_scale)
    tol = max(TOL[dtype][0], 2 * (lowp.float() - r).abs().max().item(), 4e-3 if dtype != torch.float32 else 0)
    torch.testing.assert_close(out.float(), r, atol=tol, rtol=TOL[dtype][1])
    for i, n in enumerate(lens):
        if n == 0:
            assert torch.equal(out[i].float(), torch.zeros_like(out[i].float())), "empty sequence must give zeros"


# (B, Hq, Hkv, D, lens): MHA (fp32 multiply-reduce path), GQA 4 and 3 (tensor-core path, heads
# padded to 16), a length-0 sequence, lengths on and off the block boundary, D not a power of two.
DECODE_CASES = [(3, 4, 4, 20, (13, 0, 16)), (2, 8, 2, 32, (1, 37)), (2, 6, 2, 20, (24, 5))]


@cpu_only
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_int8_kv_decode_attention(monkeypatch, case, dtype):
    i = case + FLOATS.index(dtype)
    monkeypatch.setitem(kv_mod.INTERPRET, "NUM_SPLITS", 3 if i % 2 else 1)  # each path meets both
    b, hq, hkv, d, lens = DECODE_CASES[case]
    check_decode(b, hq, hkv, d, 24, 4, lens, dynamic=(i // 2) % 2 == 0, dtype=dtype, device="cpu")


def _decode_inputs(b, hq, hkv, d, bs, lens, dynamic, nb=None):
    nb = nb or b * -(-max(lens) // bs)
    kc, vc, ks, vs = _cache(nb, bs, hkv, d, dynamic, "cpu")
    bt = torch.randperm(nb)[: nb // b * b].reshape(b, -1).to(torch.int32)
    return kc, vc, ks, vs, bt, torch.tensor(lens, dtype=torch.int32)


@cpu_only
@pytest.mark.parametrize("splits", (1, 3))
@pytest.mark.parametrize("hq", (2, 8))  # multiply-reduce (G = 1) and dot (G = 4) paths
def test_decode_nan_reaches_the_output(monkeypatch, splits, hq):
    """A NaN in q, or in a token's K or V scale (what append stores for a NaN token), makes the
    affected heads' output NaN as in the reference, however many splits the sequence is cut into: a
    split whose sums are NaN is not taken for an empty one."""
    _uses_triton("int8_kv_decode_attention", "cpu", 1)
    monkeypatch.setitem(kv_mod.INTERPRET, "NUM_SPLITS", splits)
    kc, vc, ks, vs, bt, sl = _decode_inputs(1, hq, 2, 16, 4, [40], True)
    q = torch.randn(1, hq, 16)
    qn = q.clone()
    qn[0, 0, 0] = float("nan")
    ksn, vsn = ks.clone(), vs.clone()
    ksn[bt[0, 2], 1, 0] = float("nan")
    vsn[bt[0, 7], 3, 1] = float("nan")
    for args in ((qn, kc, vc, ks, vs), (q, kc, vc, ksn, vs), (q, kc, vc, ks, vsn)):
        out = ops.int8_kv_decode_attention(*args, bt, sl, 0.25)
        expect = ref.int8_kv_decode_attention(*args, bt, sl, 0.25)
        assert expect.isnan().any()
        assert torch.equal(out.isnan(), expect.isnan())
        torch.testing.assert_close(out, expect, atol=1e-4, rtol=1e-4, equal_nan=True)


@cpu_only
def test_decode_fp16_gqa_small_v_scales(monkeypatch):
    """GQA on tensor-core dots in fp16 with V near 1e-3 (dynamic scales near 1e-5): p * v_scale goes
    to the dot times 64, out of fp16's subnormals (there the error was 17x the output's own rounding;
    now within 2x)."""
    _uses_triton("int8_kv_decode_attention", "cpu", 1)
    monkeypatch.setitem(kv_mod.INTERPRET, "NUM_SPLITS", 1)
    torch.manual_seed(0)
    nb, bs, n = 16, 16, 256
    k, v = torch.randn(n, 1, 64), torch.randn(n, 1, 64) * 1e-3
    kc, vc = torch.zeros(nb, bs, 1, 64, dtype=torch.int8), torch.zeros(nb, bs, 1, 64, dtype=torch.int8)
    ks, vs = torch.zeros(nb, bs, 1), torch.zeros(nb, bs, 1)
    ref.kv_cache_append(k, v, kc, vc, ks, vs, torch.arange(n))
    bt, sl = torch.arange(nb, dtype=torch.int32)[None], torch.tensor([n], dtype=torch.int32)
    q = torch.randn(1, 4, 64).half()
    out = ops.int8_kv_decode_attention(q, kc, vc, ks, vs, bt, sl, 0.125).float()
    expect = ref.int8_kv_decode_attention(q.float(), kc, vc, ks, vs, bt, sl, 0.125)
    rounding = ((expect.half().float() - expect).norm() / expect.norm()).item()
    assert ((out - expect).norm() / expect.norm()).item() < 2 * rounding


@cpu_only
def test_decode_length_past_the_table_is_clamped():
    """A sequence length past its block table's capacity (invalid input; the reference and the CPU
    backend refuse it) is clamped to the capacity, as the CUDA kernels do, instead of reading the
    table past its row (which attended over block 0)."""
    _uses_triton("int8_kv_decode_attention", "cpu", 1)
    kc, vc, ks, vs, bt, _ = _decode_inputs(2, 4, 2, 16, 4, [12, 12], True)  # 3 blocks a sequence
    q = torch.randn(2, 4, 16)
    out = ops.int8_kv_decode_attention(q, kc, vc, ks, vs, bt, torch.tensor([20, 7], dtype=torch.int32), 0.25)
    expect = ref.int8_kv_decode_attention(q, kc, vc, ks, vs, bt, torch.tensor([12, 7], dtype=torch.int32), 0.25)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


@cpu_only
@pytest.mark.parametrize("splits", (1, 3))
@pytest.mark.parametrize("hq", (2, 8))
def test_decode_dead_blocks_get_no_weight(monkeypatch, splits, hq):
    """Block ids out of range (invalid; the reference and the CPU backend refuse them) give their
    positions no weight, as the CUDA kernels do: the output is the attention over the live blocks, and
    zeros where none is live (here a whole 16-position tile, so the running max stays -inf a while)."""
    _uses_triton("int8_kv_decode_attention", "cpu", 1)
    monkeypatch.setitem(kv_mod.INTERPRET, "NUM_SPLITS", splits)
    kc, vc, ks, vs, bt, _ = _decode_inputs(2, hq, 2, 16, 4, [48, 48], True)  # 12 blocks a sequence
    q = torch.randn(2, hq, 16)
    bad = bt.clone()
    bad[0, :5] = -1
    bad[0, 8] = kc.shape[0]
    bad[1] = kc.shape[0] + 3  # nothing live: zeros
    out = ops.int8_kv_decode_attention(q, kc, vc, ks, vs, bad, torch.tensor([48, 48], dtype=torch.int32), 0.25)
    live = torch.cat([bt[0, 5:8], bt[0, 9:]])[None]  # softmax over positions is order-free
    expect = ref.int8_kv_decode_attention(q[:1], kc, vc, ks, vs, live.to(torch.int32),
                                          torch.tensor([4 * live.shape[1]], dtype=torch.int32), 0.25)
    torch.testing.assert_close(out[:1], expect, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@cpu_only
def test_decode_split_heuristic_and_empty():
    assert kv_mod.num_splits(1, 32, 4096, 132) == 16  # one sequence still fills the GPU
    assert kv_mod.num_splits(64, 32, 2048, 132) == 1
    assert kv_mod.num_splits(1, 8, 100, 132) == 1  # too short to split
    kc, vc, ks, vs = _cache(4, 4, 2, 16, True, "cpu")
    out = ops.int8_kv_decode_attention(torch.randn(0, 2, 16), kc, vc, ks, vs, torch.zeros(0, 1, dtype=torch.int32),
                                       torch.zeros(0, dtype=torch.int32), 0.25)
    assert out.shape == (0, 2, 16)


# ------------------------------------------------------------------------------------------ bench code
@cpu_only
def test_bench_gpu_code_paths(monkeypatch, tmp_path):
    """The GPU benchmark's bookkeeping on tiny CPU problems (a wall-clock timer stands in for
    do_bench): every op's peers run, rows carry floors and speedups, targets, JSON/CSV (and PNG)."""
    import time

    from ptqrt import bench_gpu

    def timer(fn, rep_ms=40):
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    monkeypatch.setattr(bench_gpu, "_bench", timer)
    monkeypatch.setattr(bench_gpu, "DECODE_HEADS", 2)
    monkeypatch.setattr(bench_gpu, "DECODE_D", 16)
    ceil = dict(copy_TBps=0.01, int_mm_TOPS=0.1, int_mm_TOPS_8192x28672x8192=0.1, fp16_mm_TFLOPS=0.1)
    impls = bench_gpu._impls(("triton",), torch.device("cpu"))
    assert set(impls["triton"]) == set(bench_gpu.ALL_OPS)
    rows = bench_gpu.bench_w8a8_gemm(impls, ceil, ((32, 64),), (1, 17), "cpu")
    rows += bench_gpu.bench_w8a16_gemm(impls, ceil, ((32, 64),), (2,), "cpu")
    rows += bench_gpu.bench_quantize("quantize_per_token", impls, ceil, ((2048, 16),), "cpu")
    rows += bench_gpu.bench_kv_cache_append(impls, ceil, (8,), "cpu")
    rows += bench_gpu.bench_decode(impls, ceil, ((1, 32), (1, 32, 1)), "cpu")  # MHA, and GQA (2 over 1)
    ours = [r for r in rows if r["kind"] == "ours"]
    mha, gqa = [r for r in ours if r["op"] == "int8_kv_decode_attention"]
    assert (mha["HKV"], gqa["HKV"], gqa["H"]) == (2, 1, 2) and bench_gpu._mha(mha) and not bench_gpu._mha(gqa)
    assert bench_gpu._shape_str(mha) != bench_gpu._shape_str(gqa)  # twins and variants pair like with like
    assert any(r["kind"] == "peer" and r.get("HKV") == 1 for r in rows)  # SDPA with enable_gqa
    assert {r["op"] for r in ours} == {"w8a8_gemm", "w8a16_gemm", "quantize_per_token", "kv_cache_append",
                                       "int8_kv_decode_attention"}
    m17 = next(r for r in ours if r["op"] == "w8a8_gemm" and r["M"] == 17)
    assert {"speedup_vs_fp16 F.linear", "speedup_vs_torch._int_mm", "speedup_vs__int_mm+dequant"} <= set(m17)
    assert all(r["floor_us"] > 0 and r["us"] > 0 for r in rows)
    targets = bench_gpu.check_targets(rows)
    assert any(t["target"].startswith("w8a8_gemm") for t in targets)
    meta = dict(device="cpu test", torch=torch.__version__, triton="x", time="2000-01-01T00:00:00")
    bench_gpu.print_table(rows, ceil, meta)
    json_path, csv_path = bench_gpu.write_results(rows, ceil, meta, tmp_path)
    assert json_path.exists() and csv_path.read_text().count("\n") == len(rows) + 1
    if importlib.util.find_spec("matplotlib") is None:
        return
    assert bench_gpu.plot_results(rows, ceil, meta, tmp_path / "p.png").stat().st_size > 0


def test_bench_gpu_l2_flush(monkeypatch):
    """`ptqrt bench`'s L2 flush: inside l2_flush("read") do_bench's clear_cache (an instance attribute
    of Triton's active driver) reads the buffer and writes nothing to it; "write" is the driver's own
    method, also inside a "read" block; the driver is restored afterwards, also after an error; _bench's
    do_bench call reaches the flush FLUSH names; flush_probe times each peer once per flush."""
    import triton
    from triton import runtime

    from ptqrt import bench_gpu

    class Driver:
        zeroed = 0

        def clear_cache(self, cache):
            Driver.zeroed += 1
            cache.zero_()

    drv = Driver()
    monkeypatch.setattr(runtime.driver, "_active", drv, raising=False)
    assert runtime.driver.active is drv
    cache = torch.arange(1, 1001, dtype=torch.int32)
    with bench_gpu.l2_flush("read") as mode:
        assert mode == "read" and isinstance(drv.clear_cache, bench_gpu._ReadFlush)
        drv.clear_cache(cache)
        assert int(drv.clear_cache.out) == 500500 and int(cache[0]) == 1  # read, not written
        with bench_gpu.l2_flush("write") as inner:
            assert inner == "write" and "clear_cache" not in vars(drv)
        assert isinstance(drv.clear_cache, bench_gpu._ReadFlush)
    assert "clear_cache" not in vars(drv)
    with bench_gpu.l2_flush("write") as mode:
        assert mode == "write" and "clear_cache" not in vars(drv)
    with pytest.raises(RuntimeError, match="boom"):
        with bench_gpu.l2_flush("read"):
            raise RuntimeError("boom")
    assert "clear_cache" not in vars(drv)
    with pytest.raises(ValueError, match="flush must be one of"):
        with bench_gpu.l2_flush("none"):
            pass
    with pytest.raises(ValueError, match="flush must be one of"):
        bench_gpu.run_gpu_bench(flush="zero")

    # The timing path: a do_bench that flushes as Triton's does, through the active driver.
    def fake_do_bench(fn, warmup=0, rep=0, return_mode="median"):
        for _ in range(3):
            runtime.driver.active.clear_cache(torch.zeros(64, dtype=torch.int32))
            fn()
        return 1.0

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    for mode in bench_gpu.FLUSHES:
        reads, zeros = bench_gpu._ReadFlush.calls, Driver.zeroed
        with bench_gpu._flush_as(mode):
            assert bench_gpu._bench(lambda: None) == 1.0
        assert (bench_gpu._ReadFlush.calls - reads, Driver.zeroed - zeros) == ((3, 0) if mode == "read" else (0, 3))
    assert "clear_cache" not in vars(drv)

    seen = []
    monkeypatch.setattr(bench_gpu, "_bench", lambda fn, rep_ms=40, warmup_ms=10: seen.append(bench_gpu.FLUSH) or
                        (0.001 if bench_gpu.FLUSH == "read" else 0.002))
    monkeypatch.setattr(bench_gpu, "DECODE_HEADS", 2)
    monkeypatch.setattr(bench_gpu, "DECODE_D", 16)
    monkeypatch.setattr(bench_gpu, "PROBE_NK", ((32, 64), (48, 16)))
    monkeypatch.setattr(bench_gpu, "PROBE_L", 40)
    got = bench_gpu.flush_probe(torch.device("cpu"))
    assert sorted(got) == ["fp16 F.linear M=1 32x64", "fp16 F.linear M=1 48x16", "fp16 SDPA B=1 L=40"]
    assert all(v == {"read": 0.001, "write": 0.002} for v in got.values())
    assert seen == ["read", "write"] * 3 and bench_gpu.FLUSH == "read"


def test_bench_gpu_variants_set_their_switch_per_call(monkeypatch):
    """An opt-in kernel variant is its backend's ops, restricted to the ops it changes, each called with
    its environment switch set (and the previous value restored after the call)."""
    import os

    from ptqrt import bench_gpu

    seen = []
    monkeypatch.setattr(bench_gpu, "VARIANTS", {"triton-x": ("triton", ("w8a16_gemm",), {"PTQRT_TEST_SWITCH": "1"}, (17, None)),
                                                "triton-y": ("triton", ("w8a16_gemm",), {}, (0, 16))})
    assert bench_gpu._differs("triton", 1) and bench_gpu._differs("triton-x", 17) and not bench_gpu._differs("triton-x", 16)
    assert bench_gpu._differs("triton-y", 16) and not bench_gpu._differs("triton-y", 17)
    monkeypatch.setenv("PTQRT_TEST_SWITCH", "0")
    impls = bench_gpu._impls(("triton-x",), torch.device("cpu"))
    assert set(impls) == {"triton-x"} and set(impls["triton-x"]) == {"w8a16_gemm"}
    wrapped = bench_gpu._with_env(lambda: seen.append(os.environ["PTQRT_TEST_SWITCH"]), {"PTQRT_TEST_SWITCH": "1"})
    wrapped()
    assert seen == ["1"] and os.environ["PTQRT_TEST_SWITCH"] == "0"
    monkeypatch.delenv("PTQRT_TEST_SWITCH")
    wrapped()
    assert seen == ["1", "1"] and "PTQRT_TEST_SWITCH" not in os.environ
    x, w_q = torch.randn(2, 32), torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    y = impls["triton-x"]["w8a16_gemm"](x, w_q, torch.rand(16) + 0.1, None, 0)
    assert y.shape == (2, 16)


def test_bench_gpu_arguments_are_checked_before_anything_is_measured(monkeypatch, capsys):
    """`python -m ptqrt.bench_gpu`: an unknown op or backend, and a machine without a GPU, end it with
    one line and status 2 before the ceilings are measured (with a GPU faked for the first two)."""
    from ptqrt import bench_gpu

    def measured(*a, **k):
        raise AssertionError("measured before the arguments were checked")

    monkeypatch.setattr(bench_gpu, "measure_ceilings", measured)
    monkeypatch.setattr(bench_gpu, "flush_probe", measured)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for argv, match in ((["--backends", "triton,tritn"], "unknown backends ['tritn']; choose from reference, cpu, "),
                        (["--ops", "w8a8_gemm,gemm"], "unknown ops ['gemm']; choose from w8a8_gemm")):
        with pytest.raises(SystemExit) as e:
            bench_gpu.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("python -m ptqrt.bench_gpu: error: ") and match in err, err
        with pytest.raises(ValueError, match="unknown"):
            bench_gpu.run_gpu_bench(**({"backends": ("tritn",)} if "--backends" in argv else {"ops": ["gemm"]}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench_gpu.main(["--quick"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "error: the GPU benchmarks need a CUDA device, and none is visible" in err


def test_bench_cuda_targets(capsys):
    """The CUDA backend's targets: triton time / cuda time at every shape both ran (worst shape named,
    eager and graph), and the TOP/s rate at M = N = K = 8192."""
    from ptqrt import bench_gpu

    def row(impl, m, us, gus=None, op="w8a8_gemm", n=8, k=8):
        r = dict(op=op, impl=impl, kind="ours", M=m, N=n, K=k, us=us, TOPS=2 * m * n * k / us / 1e6)
        return dict(r, graph_us=gus) if gus else r

    rows = [row("triton", 1, 10.0, 9.0), row("cuda", 1, 10.4, 8.0), row("triton", 16, 10.0, 5.0), row("cuda", 16, 9.0, 6.0),
            row("cuda", 32, 1.0), row("triton", 1, 4.0, op="w8a16_gemm"), row("cuda", 1, 4.0, op="w8a16_gemm"),
            dict(row("triton", 1, 1.0), kind="peer", impl="fp16"),
            row("cuda", 8192, 800.0, 700.0, n=8192, k=8192), row("triton", 8192, 1000.0, n=8192, k=8192)]
    eager = {t["target"].split(":")[0]: t for t in bench_gpu.check_twins(rows)}
    assert eager["w8a8_gemm"]["measured"] == 10.0 / 10.4 and eager["w8a8_gemm"]["ok"]
    assert eager["w8a8_gemm"]["worst_shape"] == "M=1 N=8 K=8" and eager["w8a16_gemm"]["measured"] == 1.0
    (g,) = [t for t in bench_gpu.check_twins(rows, "graph") if t["target"].startswith("w8a8")]
    assert g["measured"] == 5.0 / 6.0 and not g["ok"] and g["worst_shape"] == "M=16 N=8 K=8"
    rate = {t["impl"]: t for t in bench_gpu.check_targets(rows) if "TOP/s" in t["target"]}
    assert set(rate) == {"cuda", "triton"}
    assert abs(rate["cuda"]["measured"] - 2 * 8192 ** 3 / 800e-6 / 1e12) < 1e-6 and rate["cuda"]["ok"]  # 1374 TOP/s
    assert abs(rate["triton"]["measured"] - 1099.5) < 0.1 and not rate["triton"]["ok"]
    (gr,) = [t for t in bench_gpu.check_targets(rows, "graph") if "TOP/s" in t["target"]]
    assert gr["impl"] == "cuda" and abs(gr["measured"] - rate["cuda"]["measured"] * 800.0 / 700.0) < 1e-6
    bench_gpu.print_targets(rows)
    out = capsys.readouterr().out
    assert "w8a8_gemm: cuda >= 0.95x triton at every shape" in out and "(worst: M=1 N=8 K=8)" in out


def test_bench_variant_comparison(monkeypatch, capsys):
    """compare_variants: default time / variant time per shape where both ran, eager and graph."""
    from ptqrt import bench_gpu

    monkeypatch.setattr(bench_gpu, "VARIANTS", {"triton-x": ("triton", ("w8a16_gemm",), {}, (0, 16))})
    row = lambda impl, m, us, gus=None, op="w8a16_gemm": dict(op=op, impl=impl, kind="ours", M=m, N=8, K=8, us=us,  # noqa: E731
                                                              **({"graph_us": gus} if gus else {}))
    rows = [row("triton", 1, 10.0, 8.0), row("triton-x", 1, 5.0, 8.0), row("triton", 16, 10.0), row("triton-x", 16, 20.0),
            row("triton", 32, 10.0), row("cuda", 1, 1.0), dict(row("triton", 1, 1.0), kind="peer", impl="fp16"),
            row("triton", 1, 3.0, op="w8a8_gemm")]
    (c,) = bench_gpu.compare_variants(rows)
    assert (c["variant"], c["op"], c["base"], c["n"]) == ("triton-x", "w8a16_gemm", "triton", 2)
    assert c["eager_min"] == 0.5 and c["eager_max"] == 2.0 and abs(c["eager_geo"] - 1.0) < 1e-12
    assert c["graph_min"] == c["graph_max"] == 1.0 and c["worst_shape"] == "M=16 N=8 K=8"
    bench_gpu.print_variants(rows)
    assert "triton-x" in capsys.readouterr().out
    assert bench_gpu.compare_variants([row("triton", 1, 10.0)]) == []


def test_bench_checks_variant_outputs(monkeypatch, capsys):
    """_check_variants: a variant's output against its default's, per shape (bit for bit, or within the
    op's or the variant's REL_TOL); a difference or a failure becomes a FAIL line in the targets table, the agreeing
    one and variants of other ops or outside their M range are not reported."""
    from ptqrt import bench_gpu

    monkeypatch.setattr(bench_gpu, "VARIANTS", {"x-same": ("x", ("w8a16_gemm",), {}, (0, 16)),
                                                "x-off": ("x", ("w8a16_gemm",), {}, (0, 16)),
                                                "x-late": ("x", ("w8a16_gemm",), {}, (32, None)),
                                                "x-boom": ("x", ("w8a16_gemm",), {}, (0, None)),
                                                "x-near": ("x", ("int8_kv_decode_attention",), {}, (0, None)),
                                                "x-order": ("x", ("w8a16_gemm",), {}, (0, None))})
    monkeypatch.setattr(bench_gpu, "_MISMATCHES", [])
    monkeypatch.setitem(bench_gpu.REL_TOL, ("x-order", "w8a16_gemm"), 1e-2)  # a tolerance for one variant
    one = torch.ones(4)

    def boom():
        raise RuntimeError("launch failed\nmore")

    impls = {"x": {"w8a16_gemm": lambda: one, "int8_kv_decode_attention": lambda: one},
             "x-same": {"w8a16_gemm": lambda: one.clone()}, "x-off": {"w8a16_gemm": lambda: one + 1},
             "x-late": {"w8a16_gemm": lambda: one + 1}, "x-boom": {"w8a16_gemm": boom},
             "x-near": {"int8_kv_decode_attention": lambda: one * (1 + 1e-3)},
             "x-order": {"w8a16_gemm": lambda: one * (1 + 1e-3)}}
    bench_gpu._check_variants("w8a16_gemm", dict(M=1, N=4, K=4), impls, lambda f: (f(),))
    bench_gpu._check_variants("int8_kv_decode_attention", dict(B=1, L=4, HKV=1), impls, lambda f: (f(),))
    got = {m["variant"]: m["why"] for m in bench_gpu._MISMATCHES}
    assert set(got) == {"x-off", "x-boom"} and got["x-boom"] == "RuntimeError: launch failed"
    assert "max |difference| 1" in got["x-off"]
    bench_gpu.print_targets([])
    out = capsys.readouterr().out
    assert "FAIL  x-off" in out and "output differs from x at M=1 N=4 K=4" in out


# ------------------------------------------------------------------------------------------ compile
@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Each kernel builds to an sm_90 cubin at a default launch config, with Triton's own ptxas and no
    GPU (`python -m ptqrt.kernels.compile_check --all` builds every config for sm_80 and sm_90)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    code = _MAP_KERNELS + ("from ptqrt.kernels import compile_check\n"
                           "sys.exit(compile_check.main(['--arch', '90', '--quick']))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


# ------------------------------------------------------------------------------------------ GPU
# GPU tests run the untuned default configs (autotuning every variant would mostly time the
# compiler), except test_gpu_autotuned. Most use the variant the benchmark times (fp16, per-token
# scales, no bias), and test_gpu_config runs every config the autotuner may pick in it, one test
# per config so that `pytest -n` compiles them in parallel; the benchmark then finds those kernels
# in Triton's cache.
@pytest.fixture
def untuned(monkeypatch):
    monkeypatch.setenv("PTQRT_TRITON_AUTOTUNE", "0")


@pytest.mark.gpu
def test_gpu_quantize(untuned):
    for dtype in FLOATS:
        check_quantize_per_token(8192, 8192, dtype, smooth=False, device="cuda")
    check_quantize_per_token(4096, 11008, torch.bfloat16, smooth=True, device="cuda")
    check_quantize_per_token(3, 40000, torch.float16, smooth=True, device="cuda")  # two-pass rows
    check_quantize_per_tensor(4096, 4096, torch.float16, smooth=True, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("m", (1, 3, 16, 17, 512, 2048))
def test_gpu_w8a8_gemm(untuned, m):
    check_w8a8(m, 4096, 4096, torch.float16, True, None, "cuda", repeat=2)
    check_w8a8(m, 1024, 4096, torch.float16, True, None, "cuda", repeat=2)  # split-K for M <= 16
    if m in (1, 2048):
        check_w8a8(m, 4096, 4096, torch.int32, True, None, "cuda")
    if m in (3, 17):
        check_w8a8(m, 4096, 4096, torch.bfloat16, False, torch.bfloat16, "cuda")
        check_w8a8(m, 4100, 4104, torch.float16, True, torch.float32, "cuda")  # K, N not multiples of 16


@pytest.mark.gpu
@pytest.mark.parametrize("m", (17, 512, 2048))
def test_gpu_w8a8_gemm_tma(untuned, monkeypatch, m):
    """PTQRT_TRITON_TMA=1 (sm_90): the TMA kernel's default configs on a persistent grid; unset, from
    TMA_MIN_M rows only."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA descriptors: sm_90")
    calls = _tma_on(monkeypatch)
    check_w8a8(m, 4096, 4096, torch.float16, True, None, "cuda", repeat=2)
    check_w8a8(m, 4100, 4112, torch.bfloat16, m != 512, torch.float32, "cuda")  # N, K tails in the boxes
    check_w8a8(m, 1000, 3008, torch.float32, True, None, "cuda")  # fp32 out: the pointer kernel
    assert calls == [(m, 4096, 4096)] * 2 + [(m, 4100, 4112)]
    monkeypatch.delenv("PTQRT_TRITON_TMA")  # the default: from TMA_MIN_M rows
    calls.clear()
    check_w8a8(m, 4096, 4096, torch.float16, True, None, "cuda")
    assert calls == ([(m, 4096, 4096)] if m >= w8a8_mod.TMA_MIN_M else [])


@pytest.mark.gpu
@pytest.mark.parametrize("m", (1, 16, 17, 512))
def test_gpu_w8a16_gemm(untuned, m):
    check_w8a16(m, 4096, 4096, 0, torch.float16, False, "cuda")
    check_w8a16(m, 1024, 4096, 0, torch.float16, False, "cuda")  # split-K for M <= 16
    if m in (1, 512):
        check_w8a16(m, 4096, 4096, 128, torch.bfloat16, True, "cuda")


@pytest.mark.gpu
def test_gpu_w8a16_gemm_fp32_and_odd_groups(untuned):
    check_w8a16(3, 1000, 960, 96, torch.float32, True, "cuda")
    check_w8a16(300, 1000, 960, 96, torch.float16, True, "cuda")


@pytest.mark.gpu
def test_gpu_kv_cache(untuned):
    check_kv_cache_append(300, 64, 16, 8, 128, True, True, torch.float16, "cuda")
    check_kv_cache_append(300, 64, 16, 8, 128, False, True, torch.bfloat16, "cuda")
    lens = (4096, 0, 1, 1000)
    for hq, hkv, dynamic, dtype in ((32, 32, True, torch.float16), (32, 8, True, torch.float16),
                                    (32, 8, False, torch.bfloat16), (32, 32, False, torch.float32)):
        check_decode(4, hq, hkv, 128, 2048, 16, lens, dynamic, dtype, "cuda")
    check_decode(1, 32, 32, 128, 2048, 16, (32000,), True, torch.float16, "cuda")  # one long sequence, split


@pytest.mark.gpu
def test_gpu_cuda_graph_replay(untuned):
    """Split-K GEMVs and split decode replay correctly from a CUDA graph (counters reset per replay)."""
    x_q, w_q = rand_int8(5, 4096, device="cuda"), rand_int8(1024, 4096, device="cuda")
    xs, ws = rand_scale(5, device="cuda"), rand_scale(1024, device="cuda")
    x = torch.randn(5, 4096, device="cuda", dtype=torch.float16)
    kc, vc, ks, vs = _cache(512, 16, 8, 128, True, "cuda")
    q = torch.randn(2, 8, 128, device="cuda", dtype=torch.float16)
    bt = torch.randperm(512, device="cuda")[:2 * 256].reshape(2, 256).to(torch.int32)
    lens = torch.tensor([4000, 17], dtype=torch.int32, device="cuda")

    def step():
        return (ops.w8a8_gemm(x_q, xs, w_q, ws, None, torch.float16), ops.w8a16_gemm(x, w_q, ws, None, 0),
                ops.int8_kv_decode_attention(q, kc, vc, ks, vs, bt, lens, 0.088))

    eager = step()  # compiles; a graph cannot capture compilation
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(outs, eager):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_autotuned(monkeypatch):
    monkeypatch.setenv("PTQRT_TRITON_AUTOTUNE", "1")
    for m in (1, 16, 2048):
        check_w8a8(m, 4096, 4096, torch.float16, True, None, "cuda", repeat=2)
        check_w8a16(m, 4096, 4096, 0, torch.float16, False, "cuda")


def _all_configs():
    for mod in (w8a8_mod, w8a16_mod):
        for i, cfg in enumerate(mod.GEMV_CONFIGS):
            yield pytest.param(mod, "gemv", i, id=f"{mod.__name__.rsplit('.', 1)[1]}-gemv-{i}")
        for size, cfgs in mod.GEMM_CONFIGS.items():
            for i in range(len(cfgs)):
                yield pytest.param(mod, size, i, id=f"{mod.__name__.rsplit('.', 1)[1]}-gemm{min(size, 4096)}-{i}")


@pytest.mark.gpu
@pytest.mark.parametrize("mod,size,i", list(_all_configs()))
def test_gpu_config(untuned, monkeypatch, mod, size, i):
    """Each config the autotuner may pick computes the right thing (the GEMV ones with their split)."""
    import triton

    if size == "gemv":
        cfg = mod.GEMV_CONFIGS[i]
        tile = {k: v for k, v in cfg.kwargs.items() if k != "SPLIT_K"}
        monkeypatch.setattr(mod, "GEMV_DEFAULT",
                            triton.Config(tile, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        monkeypatch.setattr(mod, "default_gemv_split", lambda *_: cfg.kwargs["SPLIT_K"])
        m = 5
    else:
        monkeypatch.setitem(mod.GEMM_DEFAULT, size, mod.GEMM_CONFIGS[size][i])
        m = min(size, 2048) - 3
    if mod is w8a8_mod:
        check_w8a8(m, 4096, 4096, torch.float16, True, None, "cuda", repeat=2)
    else:
        check_w8a16(m, 4096, 4096, 0, torch.float16, False, "cuda")


# ------------------------------------------------------------------------------------------ host glue
def test_host_int_helpers_match_triton():
    """The launchers' plain-int cdiv / next_pow2 equal triton's (which cost ~3 us a host call)."""
    import triton

    from ptqrt.kernels import _common

    for n in list(range(0, 300)) + [4095, 4096, 4097, 11008, 28672, 1 << 20, (1 << 20) + 1]:
        assert _common.next_pow2(n) == triton.next_power_of_2(n), n
        for b in (1, 2, 3, 16, 64, 128, 256):
            assert _common.cdiv(n, b) == triton.cdiv(n, b), (n, b)


def test_scratch_buffers_are_shared_per_caller_and_grow():
    import threading

    from ptqrt.kernels import _common

    dev = torch.device("cpu")
    a = _common.scratch(dev, 100, torch.float32, "test")
    assert a.numel() >= 100 and a.dtype == torch.float32
    assert _common.scratch(dev, 50, torch.float32, "test").data_ptr() == a.data_ptr()  # reused
    assert _common.scratch(dev, 50, torch.int32, "test").data_ptr() != a.data_ptr()    # per dtype
    assert _common.scratch(dev, 50, torch.float32, "other").data_ptr() != a.data_ptr()  # per tag
    big = _common.scratch(dev, 1000, torch.float32, "test")
    assert big.numel() >= 1000
    other = []
    t = threading.Thread(target=lambda: other.append(_common.scratch(dev, 10, torch.float32, "test")))
    t.start()
    t.join()
    assert other[0].data_ptr() != big.data_ptr()  # another thread never shares a caller's partials
