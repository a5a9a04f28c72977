"""The cuda backend (csrc/cuda) against ptqrt.reference, and the tuner (ptqrt/tune.py).

Three layers run the same kernel source:

* ``test_extension_*`` (CPU; needs CUDA torch and nvcc, no GPU): the extension compiles for sm_80 and
  sm_90a, links, loads, and registers the six ``torch.ops.ptqrt_cuda`` ops with ptqrt's schemas. The
  first build takes minutes on 2 cores; it is cached by content hash under $PTQRT_CACHE_DIR.
* emulator tests (CPU, marked slow): the kernels, launchers and host glue compiled as C++ against
  csrc/cuda/emu/emu.h, a SIMT emulator (warp collectives with the PTX fragment layouts, barriers,
  cp.async that lands as late as allowed), registered as ``torch.ops.ptqrt_cuda_emu`` on CPU tensors.
  Small odd shapes; a divergent mma, a missing barrier or wait, a wrong fragment index all fail here.
* ``@pytest.mark.gpu``: the real extension through ptqrt's public ops with ``set_backend("cuda")``,
  at real and odd sizes (``pytest -m gpu tests/test_cuda_backend.py``).

Kernel outputs are allocated inside the ops; the allocator's free pool is filled with poisoned
blocks of the output's size first (NaN / INT_MIN), so an unwritten element shows. In-place caches
start from random bytes and are compared whole.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from util import ODD_M, TOL, poison_like, rand_int8, rand_scale

from ptqrt import _build, ops
from ptqrt import reference as ref

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
EMU_NS = "ptqrt_cuda_emu"


# ------------------------------------------------------------------------------------------ build
def _normalized_schema(schema) -> str:
    """Schema text without the namespace and with alias sets unnamed (ptqrt's are a2, a3...)."""
    s = str(schema).split("::", 1)[1]
    return re.sub(r"\((\w+)!\)", "(!)", s)


def test_extension_builds_loads_and_registers(monkeypatch):
    """The CUDA extension compiles (sm_80 + sm_90a), links, loads without a GPU, and registers the six
    ops with exactly the schemas of ptqrt/ops.py."""
    why = _build.cuda_unavailable_reason()
    if why is not None:
        pytest.skip(why)
    monkeypatch.setenv("MAX_JOBS", os.environ.get("MAX_JOBS", "2"))
    path = _build.build("cuda")
    assert Path(path).is_file()
    torch.ops.load_library(path)  # idempotent; build() already loaded it
    for name in ops.OP_NAMES:
        assert hasattr(torch.ops.ptqrt_cuda, name), f"ptqrt_cuda.{name} is not registered"
        mine = getattr(torch.ops.ptqrt_cuda, name).default._schema
        theirs = getattr(torch.ops.ptqrt, name).default._schema
        assert _normalized_schema(mine) == _normalized_schema(theirs), (str(mine), str(theirs))


def test_extension_sources_are_torch_free():
    """Kernels and launchers (.cu, kernels/*.cuh) never include torch: nvcc then never parses ATen,
    and the emulator can build them without CUDA torch."""
    root = _build.csrc_dir() / "cuda"
    for p in list(root.glob("*.cu")) + list(root.glob("kernels/*.cuh")) + [root / "launch.h"]:
        text = p.read_text()
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), f"{p.name} includes torch headers"


def test_generated_wgmma_wrappers_are_current():
    """kernels/sm90_wgmma.cuh is exactly what scripts/gen_wgmma.py writes."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gen_wgmma", root / "scripts" / "gen_wgmma.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.OUT.read_text() == gen.render(), "run: python scripts/gen_wgmma.py"
    text = gen.render()
    for n in gen.SHAPES:  # each wrapper names all N / 2 accumulators, the 4 A registers, desc and scale
        assert f"m64n{n}k16.f32.f16.f16" in text and f"m64n{n}k16.f32.bf16.bf16" in text
        assert f'"+f"(d[{n // 2 - 1}])' in text and f"%{n // 2 + 5}, 0" in text


# ------------------------------------------------------------------------------------------ emulator
def _cuda_header_dir():
    """An include folder with the CUDA runtime headers (cuda_runtime.h and crt/), or None."""
    import shutil

    from torch.utils import cpp_extension

    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands = []
    for home in filter(None, homes):
        cands += [os.path.join(home, "include")] + sorted(glob.glob(os.path.join(home, "targets", "*", "include")))
    cands += _build.nvidia_includes()
    for c in cands:
        if os.path.isfile(os.path.join(c, "cuda_runtime.h")) and os.path.isfile(os.path.join(c, "crt", "host_defines.h")):
            return c
    return None


def _emu_library() -> str:
    """Build (or reuse) the emulator library ptqrt_cuda_emu under a file lock; return its path."""
    from torch.utils import cpp_extension

    root = _build.csrc_dir() / "cuda"
    files = sorted(p for p in root.rglob("*") if p.suffix in (".cu", ".cuh", ".h", ".cpp"))
    flags = ["-O1", "-DPTQRT_CUDA_EMU", "-Wno-unknown-pragmas"]
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(repr(flags).encode() + torch.__version__.encode() + sys.version.encode())
    out = _build.cache_root() / f"cuda-emu-{h.hexdigest()[:16]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    so, done = out / f"{EMU_NS}.so", out / "BUILD_OK"
    with open(str(out) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (done.exists() and so.exists()):
                import shutil

                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                os.environ.setdefault("MAX_JOBS", "2")
                cpp_extension.load(name=EMU_NS, sources=[str(root / "emu" / "emu_kernels.cpp"),
                                                         str(root / "emu" / "emu_host.cpp")],
                                   build_directory=str(out), is_python_module=False, extra_cflags=flags,
                                   extra_include_paths=[str(_build.csrc_dir()), _cuda_header_dir()])
                done.write_text(str(so))
            else:
                torch.ops.load_library(str(so))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(so)


_emu_state: dict = {}


def _emu_ready():
    """Build and load the emulator once per session. Without CUDA headers it skips; a compile error in
    the kernels fails (it is a bug in them)."""
    if _cuda_header_dir() is None:
        pytest.skip("the CUDA emulator needs the CUDA runtime headers (cuda_runtime.h, crt/); none found")
    if "path" not in _emu_state:
        _emu_state["path"] = _emu_library()


class Impl:
    """Calls one op of the cuda backend: the real one through ptqrt's public ops (forced to "cuda"),
    or the emulator build on CPU tensors."""

    def __init__(self, kind: str):
        self.kind = kind
        self.device = "cuda" if kind == "gpu" else "cpu"

    def __call__(self, op: str, *args):
        if self.kind == "gpu":
            ops.set_backend("cuda")
            m = args[0].shape[0]
            assert ops.backend_for(op, "cuda", m) == "cuda", f"{op} did not dispatch to the cuda backend"
            return getattr(ops, op)(*args)
        return getattr(getattr(torch.ops, EMU_NS), op)(*args)

    @property
    def emu(self) -> bool:
        return self.kind == "emu"

    @property
    def small(self) -> bool:
        """Only the small odd shapes: in the emulator, and under compute-sanitizer
        (PTQRT_CUDA_TEST_SMALL=1, see bench/device_check_cuda.sh)."""
        return self.emu or os.environ.get("PTQRT_CUDA_TEST_SMALL") == "1"


@pytest.fixture(params=[pytest.param("emu", marks=pytest.mark.slow), pytest.param("gpu", marks=pytest.mark.gpu)])
def impl(request):
    if request.param == "emu":
        _emu_ready()
    return Impl(request.param)


def _poison_pool(shape, dtype, device, copies: int = 4) -> None:
    """Leave `copies` freed blocks of this size full of poison in the allocator, so that an output the
    op allocates next most likely starts as NaN / INT_MIN rather than as zeros."""
    blocks = [poison_like(torch.empty(shape, dtype=dtype, device=device)) for _ in range(copies)]
    del blocks


def _rand(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, device=device) * scale).to(dtype)


def _lowp_close(out, r, lowp):
    """out within max(2x the error of the same math in out's dtype, the dtype tolerance) of r, the
    tolerance scaled by the output's magnitude."""
    assert out.shape == r.shape and out.dtype == r.dtype
    big = max(1.0, r.float().abs().max().item()) if r.numel() else 1.0
    atol, rtol = TOL[out.dtype]
    err_ref = (lowp.float() - r.float()).abs().max().item() if r.numel() else 0.0
    assert torch.isfinite(out.float()).all(), "non-finite output (unwritten or overflowed elements)"
    torch.testing.assert_close(out.float(), r.float(), atol=max(atol * big, 2 * err_ref), rtol=rtol)


# Emulated runs are ~10^4 times slower than a GPU: a few odd shapes per path. The GPU adds real sizes.
def _shapes_mk(impl):
    base = [(0, 40)] + list(zip(ODD_M, (33, 47, 100, 17, 64, 130)))  # M = 0, 1, 2, 3, 16, 17, 127
    return base if impl.small else base + [(4096, 4096), (1, 8192), (333, 5000)]


# ------------------------------------------------------------------------------------------ quantize
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_per_token(impl, dtype):
    dev = impl.device
    for i, (m, k) in enumerate(_shapes_mk(impl)):
        x = _rand((m, k), dtype, dev, 3.0)
        sm = (torch.rand(k, device=dev) + 0.5).to(FLOATS[i % 3]) if i % 2 else None
        _poison_pool((m, k), torch.int8, dev)
        q, s = impl("quantize_per_token", x, sm)
        q_ref, s_ref = ref.quantize_per_token(x, sm)
        assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == (m, k) and s.shape == (m,)
        assert torch.equal(q, q_ref), f"[{m}, {k}]: codes differ at {(q != q_ref).nonzero()[:5].tolist()}"
        assert torch.equal(s, s_ref), f"[{m}, {k}]: scales differ"


@pytest.mark.parametrize("recip", ("0", "1"), ids=("division", "reciprocal"))
@pytest.mark.parametrize("one_pass", (None, "0"), ids=("default", "two-pass"))
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_per_token_row_lengths(impl, dtype, one_pass, recip, monkeypatch):
    """Every per-token kernel: by default rows held in registers in 1, 2 and 4 vectors a thread, the
    two-pass kernel past that and for empty rows (PTQRT_CUDA_QUANT_1PASS=0: the two-pass kernel for all);
    a NaN and a tie among them (a row's max set so that some x / s lands on .5); rows shorter than one
    vector a thread (the one-pass kernel's chunks past the row's end load its first vector)."""
    monkeypatch.setenv("PTQRT_CUDA_QUANT_RECIPROCAL", recip)  # (the reciprocal form too: the same codes)
    if one_pass is None:
        monkeypatch.delenv("PTQRT_CUDA_QUANT_1PASS", raising=False)
    else:
        monkeypatch.setenv("PTQRT_CUDA_QUANT_1PASS", one_pass)
    dev = impl.device
    vec = 16 // torch.tensor([], dtype=dtype).element_size()
    for i, units in enumerate((200, 300, 500, 800, 1024, 1025, 1500, 0, 1, 33)):
        k = units * vec
        x = _rand((3, k), dtype, dev, 3.0)
        if k:
            x[0, 7 % k] = float("nan")
            x[1, 0], x[1, 5 % k] = 127.0, 2.5  # without smoothing s = 1: 2.5 is a tie, rounds to 2
        sm = (torch.rand(k, device=dev) + 0.5).to(FLOATS[i % 3]) if i % 2 else None
        _poison_pool((3, k), torch.int8, dev)
        q, s = impl("quantize_per_token", x, sm)
        q_ref, s_ref = ref.quantize_per_token(x, sm)
        assert torch.equal(q, q_ref), f"K={k}: codes differ at {(q != q_ref).nonzero()[:5].tolist()}"
        torch.testing.assert_close(s, s_ref, rtol=0, atol=0, equal_nan=True, msg=f"K={k}: scales differ")


@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_per_tensor(impl, dtype):
    dev = impl.device
    for i, (m, k) in enumerate(_shapes_mk(impl)):
        x = _rand((m, k), dtype, dev, 3.0)
        sm = (torch.rand(k, device=dev) + 0.5).to(FLOATS[i % 3]) if i % 2 == 0 else None
        scale = torch.tensor([0.037], device=dev)
        _poison_pool((m, k), torch.int8, dev)
        q = impl("quantize_per_tensor", x, scale, sm)
        assert torch.equal(q, ref.quantize_per_tensor(x, scale, sm)), f"[{m}, {k}]"


def _near_half_integers(amax: float, n: int, gen: torch.Generator) -> torch.Tensor:
    """A float32 row of absmax `amax` whose other n values lie within 3 ulps of (k + 1/2) * amax / 127:
    each v / s within a few ulps of a half-integer, where v * (1 / s) and the quotient can round apart."""
    s = torch.tensor(amax, dtype=torch.float32) / 127
    v = (torch.randint(-126, 126, (n,), generator=gen).float() + 0.5) * s
    v = (v.view(torch.int32) + torch.randint(-3, 4, (n,), generator=gen, dtype=torch.int32)).view(torch.float32)
    return torch.cat([torch.tensor([amax]), v])


@pytest.mark.parametrize("recip", ("0", "1"), ids=("division", "reciprocal"))
def test_quantize_near_half_integers(impl, recip, monkeypatch):
    """Values a few ulps from every rounding boundary (v / s near half-integers, at scales whose
    reciprocal is not exact), per token, per tensor and in kv_cache_append's token kernel: bit for bit
    against the reference's IEEE division. (A kernel that multiplied by 1 / s instead would round
    some of these apart unchecked.) PTQRT_CUDA_QUANT_RECIPROCAL=1: the kernels' multiply-then-check form
    (kernels/common.cuh, ScaleDivider), the same codes."""
    monkeypatch.setenv("PTQRT_CUDA_QUANT_RECIPROCAL", recip)
    dev = impl.device
    gen = torch.Generator().manual_seed(7)
    x = torch.stack([_near_half_integers(a, 4095, gen) for a in (0.37, 3.1e-3, 113.7, 1.0 + 2**-20, 6e4)])
    q, s = impl("quantize_per_token", x.to(dev), None)
    q_ref, s_ref = ref.quantize_per_token(x)
    assert torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu(), q_ref)
    for row in x:
        st = torch.tensor([float(row[0]) / 127], dtype=torch.float32)
        assert torch.equal(impl("quantize_per_tensor", x.to(dev), st.to(dev), None).cpu(), ref.quantize_per_tensor(x, st))
    # kv_cache_append, dynamic scales: 32 heads of 128 per token, each head's row near half-integers;
    # 80 tokens x k and v: the token kernel on GPUs of up to 160 SMs (and the emulator's 8)
    monkeypatch.setenv("PTQRT_EMU_SMS", "8")
    t, h, d = 80, 32, 128
    k = torch.stack([_near_half_integers(0.37 + 0.01 * i, d - 1, gen) for i in range(t * h)]).reshape(t, h, d)
    caches = [torch.zeros(25, 4, h, d, dtype=torch.int8) for _ in range(2)]
    scales = [torch.zeros(25, 4, h) for _ in range(2)]
    mine = [c.clone().to(dev) for c in caches + scales]
    slots = torch.randperm(100, generator=gen)[:t]
    impl("kv_cache_append", k.to(dev), k.to(dev), *mine, slots.to(dev))
    theirs = caches + scales
    ref.kv_cache_append(k, k, *theirs, slots)
    for a, b in zip(mine, theirs):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("recip", ("0", "1"), ids=("division", "reciprocal"))
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_rounding_and_special_values(impl, dtype, recip, monkeypatch):
    """Ties round to even, NaN -> 0 with a NaN scale, Inf rows, all-zero rows (scale 1), saturation;
    K = 16 and 12 take the vector and the scalar paths; by division and by PTQRT_CUDA_QUANT_RECIPROCAL=1."""
    monkeypatch.setenv("PTQRT_CUDA_QUANT_RECIPROCAL", recip)
    dev = impl.device
    for k in (16, 12):
        x = torch.zeros(5, k, dtype=torch.float32)
        # scale = 127 / 127 = 1 exactly, so v / s are the ties themselves
        x[0, :12] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5, 4.5, -0.0])
        x[1] = torch.randn(k)
        x[1, 3] = float("nan")
        x[2] = torch.randn(k)
        x[2, 5] = float("inf")
        x[4] = torch.randn(k) * 1e-3  # row 3 stays all zeros
        x = x.to(dtype).to(dev)
        q, s = impl("quantize_per_token", x, None)
        q_ref, s_ref = ref.quantize_per_token(x)
        assert torch.equal(q, q_ref)
        assert q[0, :12].tolist() == [127, 0, 2, 2, 0, -2, -2, 4, 126, -126, 4, 0]
        assert torch.equal(s.isnan(), s_ref.isnan()) and bool(s[1].isnan())
        assert torch.equal(s[~s.isnan()], s_ref[~s_ref.isnan()]) and s[3].item() == 1.0
        for scale in (1.0, 1e-30):  # 1e-30: every code saturates at +-127, NaN still 0
            st = torch.tensor([scale], device=dev)
            assert torch.equal(impl("quantize_per_tensor", x, st, None), ref.quantize_per_tensor(x, st))


# ------------------------------------------------------------------------------------------ w8a8_gemm
def _w8a8_cases(impl):
    """(M, N, K): the GEMV path (M <= 16), both tiles, K padded (K % 16 != 0), split-K on both tiles
    (short M, long K), M = 0."""
    cases = [(0, 33, 47), (1, 33, 47), (2, 72, 100), (3, 130, 17), (16, 72, 100), (17, 33, 47), (65, 40, 64),
             (127, 130, 272), (1, 64, 1040), (5, 70, 2048), (33, 40, 1040), (70, 40, 1024)]
    if not impl.small:
        cases += [(4096, 4096, 4096), (1, 4096, 4096), (16, 11008, 4096), (333, 1000, 3000), (2, 8192, 8192)]
    return cases


W8A8_OUT = (torch.float16, torch.bfloat16, torch.float32, torch.int32)


@pytest.mark.parametrize("wgmma", ["0", "1"])
def test_w8a8_gemm_int32_is_exact(impl, wgmma, monkeypatch):
    """mma.sync kernel (PTQRT_CUDA_WGMMA=0) and the default (wgmma for M > 64 on sm_90)."""
    monkeypatch.setenv("PTQRT_CUDA_WGMMA", wgmma)
    dev = impl.device
    for m, n, k in _w8a8_cases(impl):
        x_q, w_q = rand_int8(m, k, device=dev), rand_int8(n, k, device=dev)
        _poison_pool((m, n), torch.int32, dev)
        acc = impl("w8a8_gemm", x_q, rand_scale(1, device=dev), w_q, rand_scale(n, device=dev), None, torch.int32)
        expect = ref.int32_matmul(x_q, w_q)
        assert acc.dtype == torch.int32 and torch.equal(acc, expect), f"[{m}, {n}, {k}]"


def _check_w8a8_exact(impl, out_dtype, cases, extremes=False):
    """Each (M, N, K) case equal to the reference bit for bit: per-token and per-tensor x_scale, bias in
    each float dtype or none (never with int32 output); extremes: -128 in both operands."""
    dev = impl.device
    for i, (m, n, k) in enumerate(cases):
        x_q, w_q = rand_int8(m, k, device=dev), rand_int8(n, k, device=dev)
        if extremes:
            x_q[0, : k // 3], w_q[: n // 2, : k // 3] = -128, -128
        x_scale = rand_scale(m if i % 2 else 1, device=dev)
        w_scale = rand_scale(n, device=dev)
        bias = None if out_dtype == torch.int32 or i % 3 == 2 else _rand((n,), FLOATS[i % 3], dev)
        _poison_pool((m, n), out_dtype, dev)
        y = impl("w8a8_gemm", x_q, x_scale, w_q, w_scale, bias, out_dtype)
        expect = ref.w8a8_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype)
        assert y.dtype == out_dtype and y.shape == (m, n)
        assert torch.equal(y, expect), f"[{m}, {n}, {k}]: max diff {(y.double() - expect.double()).abs().max()}"


@pytest.mark.parametrize("out_dtype", W8A8_OUT[:3])
def test_w8a8_gemm_epilogue_is_exact(impl, out_dtype, monkeypatch):
    """The fused epilogue rounds like the reference ((acc * x_scale) * w_scale + bias, fp32, no FMA),
    so float outputs match bit for bit too; per-token and per-tensor x_scale, bias in any float dtype."""
    monkeypatch.setenv("PTQRT_EMU_SMS", "4")  # the emulated GPU is small: split-K on more shapes
    monkeypatch.setenv("PTQRT_CUDA_WGMMA", "0")  # the mma.sync kernel; test_w8a8_gemm_sm90_wgmma the other
    _check_w8a8_exact(impl, out_dtype, _w8a8_cases(impl))


@pytest.mark.parametrize("out_dtype", W8A8_OUT)
def test_w8a8_gemv_odd_shapes(impl, out_dtype):
    """The M <= 16 GEMV: fewer K windows than warps, more windows per warp than a warp's loads in
    flight, K % 128 != 0 (a zero-filled tail), N % 16 != 0, K at the overflow bound, -128 in both
    operands; exact."""
    cases = [(1, 40, 80), (3, 17, 1040), (16, 72, 4224), (7, 130, 2096), (2, 24, 48), (16, 33, 3008)]
    if not impl.small:
        cases += [(1, 4096, 4096), (1, 28672, 8192), (16, 11008, 4096), (5, 1000, 8192), (9, 64, 133120)]
    _check_w8a8_exact(impl, out_dtype, cases, extremes=True)


@pytest.mark.parametrize("out_dtype", W8A8_OUT)
def test_w8a8_gemm_sm90_wgmma(impl, out_dtype, monkeypatch):
    """The sm_90a kernel (TMA + wgmma, on by default on sm_90, PTQRT_CUDA_WGMMA=0 off; M > 64, and M > 16
    where N gives a wave of 128-wide tiles): 128- and 256-wide tiles, N and K tails, more K tiles than
    pipeline stages, split-K; exact like the mma.sync kernel."""
    if impl.kind == "gpu" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernel needs a compute capability 9.0 GPU")
    monkeypatch.setenv("PTQRT_CUDA_WGMMA", "1")
    monkeypatch.setenv("PTQRT_EMU_SMS", "4")
    # One CTA a tile, the older width rule (PTQRT_CUDA_SM90_PERSISTENT=0, PTQRT_CUDA_TILE_WAVES=0). With 4
    # emulated SMs: 256-wide tiles, and 128-wide ones (127 x 130; 130 x 136, whose rows are a multiple of
    # 16 bytes: the staged epilogue, an N tail in the second column tile; 100 x 200 with split-K and more
    # K tiles than stages) where 256-wide tiles would leave SMs idle.
    monkeypatch.setenv("PTQRT_CUDA_SM90_PERSISTENT", "0")
    monkeypatch.setenv("PTQRT_CUDA_TILE_WAVES", "0")
    cases = [(65, 40, 64), (127, 130, 272), (130, 136, 272), (130, 300, 1040), (200, 17, 100), (100, 200, 1040)]
    if not impl.small:
        cases += [(4096, 4096, 4096), (8192, 8192, 8192), (333, 1000, 3000), (2048, 28672, 8192), (100, 64, 133120),
                  (512, 4096, 4096), (512, 4096, 11008), (128, 11008, 4096)]
    _check_w8a8_exact(impl, out_dtype, cases)
    # The width by rounds of CTAs (the default; here 300 x 300 goes 128-wide, 130 x 1100 and 300 x 1300
    # 256-wide on 4 SMs; the real GPU adds 512 x 11008, 128-wide, and 128 x 28672, 256-wide). 17-64 rows
    # where N gives a wave of 128-wide tiles (17 x 600 and 64 x 1000 here; 32 x 28672 and 40 x 28672 on
    # the GPU): the sm_90a kernel with most of its 128-row tile past M.
    monkeypatch.delenv("PTQRT_CUDA_TILE_WAVES")
    waves = [(130, 1100, 320), (300, 300, 448), (300, 1300, 200), (17, 600, 272), (64, 1000, 1040)]
    _check_w8a8_exact(impl, out_dtype, waves if impl.small else waves + [(512, 11008, 4096), (128, 28672, 1024),
                                                                          (32, 28672, 8192), (40, 28672, 1024)])
    # The persistent grid (the default; with the default width rule): 4 CTAs over 15 (128-wide), 9 and
    # 16 tiles (several tiles a CTA, the ring's count running on across them: 9, 2 and 3 K tiles against
    # 4 stages; N and M tails), 40 rows over 10 tiles, and a split-K shape, which keeps one CTA a tile.
    monkeypatch.delenv("PTQRT_CUDA_SM90_PERSISTENT")
    persistent = [(300, 600, 1040), (260, 700, 200), (130, 1800, 272), (40, 1200, 272), (100, 200, 1040)]
    _check_w8a8_exact(impl, out_dtype, persistent if impl.small else persistent + [(8192, 8192, 8192), (2048, 4096, 11008)])


# ------------------------------------------------------------------------------------------ w8a16_gemm
def _w8a16_cases(impl):
    """(M, N, K, group_size): GEMV (M <= 16), tensor-core GEMM (M > 16, split-K when short), odd K and
    group sizes (CUDA-core fallback), M = 0."""
    cases = [(0, 33, 64, 0), (1, 33, 64, 0), (2, 17, 48, 16), (3, 40, 47, 0), (16, 72, 256, 64), (17, 64, 128, 0),
             (40, 130, 256, 32), (70, 33, 160, 0), (5, 33, 96, 24), (20, 24, 100, 0), (1, 40, 1024, 128)]
    if not impl.small:
        cases += [(1, 4096, 4096, 0), (16, 11008, 4096, 128), (512, 4096, 4096, 0), (4096, 4096, 4096, 64),
                  (33, 1000, 3000, 0), (200, 300, 1000, 40)]
    return cases


def _check_w8a16(impl, dtype, cases):
    """Each (M, N, K, group_size) case against the reference, within twice the error of the same math
    in the activation dtype; bias in each float dtype or none."""
    dev = impl.device
    for i, (m, n, k, g) in enumerate(cases):
        x = _rand((m, k), dtype, dev)
        w_q = rand_int8(n, k, device=dev)
        w_scale = rand_scale(n, device=dev) if g == 0 else rand_scale(n * (k // g), device=dev).reshape(n, k // g)
        bias = None if i % 3 == 2 else _rand((n,), FLOATS[i % 3], dev)
        _poison_pool((m, n), dtype, dev)
        y = impl("w8a16_gemm", x, w_q, w_scale, bias, g)
        expect = ref.w8a16_gemm(x, w_q, w_scale, bias, g)
        w_lowp = ref.dequantize_weight(w_q, w_scale, g).to(dtype)
        lowp = x.float() @ w_lowp.float().T if dtype == torch.float32 else (x @ w_lowp.T).float()
        if bias is not None:
            lowp = lowp + bias.float()
        _lowp_close(y, expect, lowp.to(dtype))


@pytest.mark.parametrize("fallback", (False, True), ids=("default", "fallback"))
@pytest.mark.parametrize("dtype", FLOATS)
def test_w8a16_gemm(impl, dtype, fallback, monkeypatch):
    """The default kernels, and with the sm_90a wgmma kernel and the ring GEMV switched off (the
    mma.sync kernel and the register-staged GEMV: what other GPUs run, and the switches' fallbacks)."""
    monkeypatch.setenv("PTQRT_EMU_SMS", "4")
    if fallback:
        monkeypatch.setenv("PTQRT_CUDA_WGMMA_W8A16", "0")
        monkeypatch.setenv("PTQRT_CUDA_GEMV_RING", "0")
    _check_w8a16(impl, dtype, _w8a16_cases(impl))


@pytest.mark.parametrize("dtype", FLOATS[:2])
def test_w8a16_gemm_sm90_wgmma(impl, dtype, monkeypatch):
    """The sm_90a kernel (TMA + wgmma, weights as the register operand; the default on sm_90, M > 16):
    every token tile (64, 128, 256), M / N / K tails, more K tiles than pipeline stages, split-K, per-group
    scales whose groups cross stage boundaries, bias or none."""
    if impl.kind == "gpu" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernel needs a compute capability 9.0 GPU")
    monkeypatch.setenv("PTQRT_CUDA_WGMMA_W8A16", "1")
    monkeypatch.setenv("PTQRT_EMU_SMS", "4")
    # (M, N, K, group_size); with 4 emulated SMs: 64-token tiles; 128 with split-K; 256 (6 tiles, 7 K tiles).
    # K = 0 falls back to the mma.sync kernel (a tensor map needs a non-empty K): bias alone.
    cases = [(17, 40, 80, 0), (65, 130, 272, 16), (130, 72, 1040, 0), (300, 300, 448, 64), (40, 17, 96, 32),
             (20, 24, 0, 0)]
    if not impl.small:
        cases += [(4096, 4096, 4096, 0), (2048, 28672, 8192, 0), (512, 4096, 4096, 128), (33, 1000, 3008, 0),
                  (200, 11008, 4096, 0), (8192, 4096, 4096, 64)]
    _check_w8a16(impl, dtype, cases)


@pytest.mark.parametrize("dtype", FLOATS[:2])
def test_w8a16_gemv_ring(impl, dtype, monkeypatch):
    """The GEMV with its weights in a per-warp cp.async ring (the default; PTQRT_CUDA_GEMV_RING, M <= 16): fewer K
    windows than warps (idle warps), more windows per warp than ring stages, K % 64 != 0 (a zero-filled
    tail), N % 16 != 0, per-channel and per-group scales, bias or none."""
    monkeypatch.setenv("PTQRT_CUDA_GEMV_RING", "1")
    cases = [(1, 40, 80, 0), (3, 17, 1040, 16), (16, 72, 4160, 0), (7, 130, 2112, 64), (2, 24, 48, 0), (16, 33, 3008, 32),
             (1, 8, 16, 16)]
    if not impl.small:
        cases += [(1, 4096, 4096, 0), (1, 28672, 8192, 0), (16, 11008, 4096, 128), (5, 1000, 8192, 0)]
    _check_w8a16(impl, dtype, cases)
    # Same windows per warp, same MMA order per accumulator, same reduction: bit for bit the
    # register-staged GEMV (PTQRT_CUDA_GEMV_RING=0).
    dev = impl.device
    for m, n, k, g in cases[:4]:
        x, w_q = _rand((m, k), dtype, dev), rand_int8(n, k, device=dev)
        w_scale = rand_scale(n, device=dev) if g == 0 else rand_scale(n * (k // g), device=dev).reshape(n, k // g)
        ring = impl("w8a16_gemm", x, w_q, w_scale, None, g)
        monkeypatch.setenv("PTQRT_CUDA_GEMV_RING", "0")
        default = impl("w8a16_gemm", x, w_q, w_scale, None, g)
        monkeypatch.setenv("PTQRT_CUDA_GEMV_RING", "1")
        assert torch.equal(ring, default), f"(M, N, K, group) = {(m, n, k, g)}: the ring GEMV differs from the other"


def test_w8a16_gemm_fallback_grid_pieces(impl, monkeypatch):
    """The CUDA-core fallback (fp32 activations past 16 rows, K % 16 != 0, odd group sizes) puts its
    64-row tiles along grid y (at most 65535): more rows run as several launches, x and out offset to
    each piece's first row, bit for bit the one-launch result. In the emulator the limit is lowered to
    one tile (PTQRT_EMU_GRID_YZ=1: 3 and 4 launches); on a GPU M passes 65535 tiles."""
    dev = impl.device
    cases = [(130, 40, 64, 0, torch.float32), (200, 33, 47, 0, torch.float16), (129, 24, 96, 24, torch.bfloat16)]
    if not impl.emu:
        cases = [(65535 * 64 + 100, 8, 16, 0, torch.float32)]
    for m, n, k, g, dtype in cases:
        x, w_q = _rand((m, k), dtype, dev), rand_int8(n, k, device=dev)
        w_scale = rand_scale(n, device=dev) if g == 0 else rand_scale(n * (k // g), device=dev).reshape(n, k // g)
        bias = _rand((n,), torch.float32, dev)
        monkeypatch.setenv("PTQRT_EMU_GRID_YZ", "1")
        _poison_pool((m, n), dtype, dev)
        y = impl("w8a16_gemm", x, w_q, w_scale, bias, g)
        monkeypatch.delenv("PTQRT_EMU_GRID_YZ")
        if impl.emu:
            whole = impl("w8a16_gemm", x, w_q, w_scale, bias, g)
        else:  # each part within the limit: one launch
            cut = 65535 * 64
            whole = torch.cat([impl("w8a16_gemm", x[:cut], w_q, w_scale, bias, g),
                               impl("w8a16_gemm", x[cut:], w_q, w_scale, bias, g)])
        assert torch.equal(y, whole), f"(M, N, K, group) = {(m, n, k, g)}"
        expect = ref.w8a16_gemm(x, w_q, w_scale, bias, g)  # fp32 math in both: the dtype's tolerance
        _lowp_close(y, expect, expect)


# ------------------------------------------------------------------------------------------ kv cache
def _kv_scales(nb, bs, h, d, dynamic, dev):
    if dynamic:
        return rand_scale(nb * bs * h, device=dev).reshape(nb, bs, h), rand_scale(nb * bs * h, device=dev).reshape(nb, bs, h)
    return rand_scale(h * d, device=dev).reshape(h, d), rand_scale(h * d, device=dev).reshape(h, d)


@pytest.mark.parametrize("dynamic", (True, False), ids=("dynamic", "static"))
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("recip", ("0", "1"), ids=("division", "reciprocal"))
@pytest.mark.parametrize("kernel", (None, "row"), ids=("default", "row"))
def test_kv_cache_append(impl, dtype, dynamic, kernel, recip, monkeypatch):
    """Against the reference, bit for bit (NaN scales as NaN), with each kernel
    (PTQRT_CUDA_APPEND_KERNEL). The token kernel (the default) where there are at least as many tokens
    (times k / v launches) as multiprocessors and D is 16 / element bytes times a power of two up to 32
    (every lanes-a-row count from 1 to 32; heads past one pass and past one round of passes), and the
    row kernel elsewhere (D = 40, 130, 384, 520, a source that starts off its alignment) or when
    chosen. A NaN and an infinity in two rows (the token kernel's absmax over the bits of |x|)."""
    if kernel is None:
        monkeypatch.delenv("PTQRT_CUDA_APPEND_KERNEL", raising=False)
    else:
        monkeypatch.setenv("PTQRT_CUDA_APPEND_KERNEL", kernel)
    monkeypatch.setenv("PTQRT_EMU_SMS", "2")  # the token kernel from 2 tokens (a GPU: one a multiprocessor)
    monkeypatch.setenv("PTQRT_CUDA_QUANT_RECIPROCAL", recip)  # (the token kernel's reciprocal form)
    dev = impl.device
    cases = [(0, 2, 64, 4, 16), (5, 2, 64, 4, 16), (3, 3, 40, 3, 7), (2, 1, 130, 2, 5), (3, 2, 384, 3, 4),
             (2, 1, 520, 2, 3), (4, 2, 256, 3, 4, "offset"), (3, 3, 256, 3, 4), (7, 1, 32, 3, 4),
             (3, 5, 8, 2, 4), (2, 3, 4, 2, 4), (3, 37, 16, 2, 4), (2, 18, 128, 2, 4), (2, 70, 64, 2, 4)]
    if not impl.small:
        cases += [(4096, 8, 128, 300, 16), (7, 4, 256, 9, 32), (300, 32, 128, 40, 16, "offset")]
    for t, h, d, nb, bs, *offset in cases:
        k_cache, v_cache = rand_int8(nb, bs, h, d, device=dev), rand_int8(nb, bs, h, d, device=dev)
        k_scale, v_scale = _kv_scales(nb, bs, h, d, dynamic, dev)
        k, v = _rand((t, h, d), dtype, dev, 2.0), _rand((t, h, d), FLOATS[(FLOATS.index(dtype) + t) % 3], dev)
        if t > 2:
            k[0, h - 1, d - 1] = float("nan")
            v[2, 0, d // 2] = float("inf")
        if offset:
            k = _offset_view(k)
        slots = torch.randperm(nb * bs, device=dev)[:t]
        if t > 1:
            slots[1] = -1  # padding: skipped
        for sl in (slots, slots.to(torch.int32)):
            mine = [c.clone() for c in (k_cache, v_cache, k_scale, v_scale)]
            theirs = [c.clone() for c in (k_cache, v_cache, k_scale, v_scale)]
            impl("kv_cache_append", k, v, *mine, sl)
            ref.kv_cache_append(k, v, *theirs, sl)
            for name, a, b in zip(("k_cache", "v_cache", "k_scale", "v_scale"), mine, theirs):
                same = torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                             and torch.equal(a.nan_to_num(), b.nan_to_num()))
                assert same, f"{name} differs for T={t}, H={h}, D={d}, slots {sl.dtype}"
    monkeypatch.setenv("PTQRT_CUDA_APPEND_KERNEL", "vec4")  # an unknown kernel is refused, not ignored
    with pytest.raises(RuntimeError, match="PTQRT_CUDA_APPEND_KERNEL"):
        impl("kv_cache_append", k, v, k_cache, v_cache, k_scale, v_scale, slots)


# ------------------------------------------------------------------------------------------ decode attention
def _attn_cases(impl):
    """(B, Hq, Hkv, D, num_blocks, block_size, max_blocks, seq_lens): MHA and GQA groups 2, 3 (padded to
    4), 8, 12 (two CTAs per kv head); D not a multiple of 16 and D > 256; a length-0 sequence; enough
    tokens for several splits."""
    cases = [(2, 4, 2, 64, 10, 16, 4, [37, 0]), (3, 6, 2, 40, 12, 7, 5, [1, 35, 20]), (1, 12, 1, 72, 40, 16, 40, [600]),
             (1, 2, 2, 300, 4, 16, 3, [40]), (2, 8, 1, 128, 9, 32, 4, [100, 128]), (1, 1, 1, 8, 3, 4, 3, [9])]
    if not impl.small:
        cases += [(8, 32, 8, 128, 600, 16, 64, [1024, 1, 0, 777, 1000, 64, 512, 333]),
                  (64, 64, 8, 128, 2200, 16, 32, [512] * 64), (1, 28, 4, 96, 2100, 16, 2048, [32768])]
    return cases


def _check_decode(impl, case, dtype, dynamic) -> tuple:
    """One (B, Hq, Hkv, D, num_blocks, block_size, max_blocks, seq_lens) case against the reference;
    returns the op's arguments."""
    dev = impl.device
    b, hq, hkv, d, nb, bs, maxb, lens = case
    k_cache, v_cache = rand_int8(nb, bs, hkv, d, device=dev), rand_int8(nb, bs, hkv, d, device=dev)
    k_scale, v_scale = _kv_scales(nb, bs, hkv, d, dynamic, dev)
    q = _rand((b, hq, d), dtype, dev)
    table = torch.stack([torch.randperm(nb, device=dev)[:maxb] for _ in range(b)]).to(torch.int32)
    args = (q, k_cache, v_cache, k_scale, v_scale, table, torch.tensor(lens, dtype=torch.int32, device=dev),
            1.0 / math.sqrt(d))
    _poison_pool((b, hq, d), dtype, dev)
    out = impl("int8_kv_decode_attention", *args)
    expect = ref.int8_kv_decode_attention(*args)
    # Softmax and P.V run in fp32 in both; only the final cast is low precision: the dtype tolerance.
    _lowp_close(out, expect, expect)
    for i, n in enumerate(lens):
        if n == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i])), "a length-0 sequence must give zeros"
    return args


@pytest.mark.parametrize("stream", (None, "0"), ids=("default", "two-phase"))
@pytest.mark.parametrize("dynamic", (True, False), ids=("dynamic", "static"))
@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_kv_decode_attention(impl, dtype, dynamic, stream, monkeypatch):
    """The default kernels (streaming where it applies, two-phase elsewhere), and with the streaming
    kernel switched off (PTQRT_CUDA_DECODE_STREAM=0: the two-phase kernel for every group size)."""
    if stream is None:
        monkeypatch.delenv("PTQRT_CUDA_DECODE_STREAM", raising=False)
    else:
        monkeypatch.setenv("PTQRT_CUDA_DECODE_STREAM", stream)
    for case in _attn_cases(impl):
        _check_decode(impl, case, dtype, dynamic)


def _stream_cases(impl):
    """Cases the streaming kernel serves (1-2 query heads per kv head with D in {64, 128, 256}, groups of
    3-4 with D in {64, 128}): partial tiles, a length-0 sequence, several splits (the emulator's 8 SMs),
    and two it does not (a group of 8, D = 40) that must fall back to the two-phase kernel."""
    cases = [(2, 4, 4, 128, 12, 16, 6, [37, 96]), (3, 4, 2, 64, 10, 8, 8, [0, 61, 5]),
             (1, 2, 1, 256, 6, 16, 6, [90]), (1, 2, 2, 128, 40, 16, 40, [600]), (2, 8, 2, 128, 6, 16, 4, [50, 9]),
             (2, 6, 2, 64, 10, 8, 8, [0, 61]), (1, 16, 2, 128, 6, 16, 4, [45]), (1, 2, 2, 40, 4, 16, 4, [33]),
             (2, 2, 2, 64, 12, 7, 5, [30, 35])]  # block size 7; 35 tokens: the whole table
    if not impl.small:
        cases += [(16, 32, 32, 128, 4200, 16, 256, [4096] * 15 + [4001]), (1, 28, 14, 128, 2100, 16, 2048, [32760]),
                  (8, 16, 8, 64, 700, 32, 80, [2500, 1, 0, 777, 2560, 64, 512, 333]), (3, 8, 8, 256, 300, 16, 90, [1400, 17, 999]),
                  (4, 32, 8, 128, 1100, 16, 256, [4096, 3000, 1, 4095]), (2, 12, 4, 64, 600, 16, 300, [4700, 33])]
    return cases


@pytest.mark.parametrize("dynamic", (True, False), ids=("dynamic", "static"))
@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_kv_decode_attention_streaming(impl, dtype, dynamic, monkeypatch):
    """The streaming decode kernel (kernels/decode_stream.cuh, the default for every group it serves;
    PTQRT_CUDA_DECODE_STREAM=1 says so explicitly) against the reference, and against the two-phase
    kernel where blocks are unreadable (ids past num_blocks: no weight in either)."""
    monkeypatch.setenv("PTQRT_CUDA_DECODE_STREAM", "1")
    for case in _stream_cases(impl):
        _check_dead_blocks(impl, monkeypatch, _check_decode(impl, case, dtype, dynamic), dtype, dynamic,
                           "PTQRT_CUDA_DECODE_STREAM")


def _check_dead_blocks(impl, monkeypatch, args, dtype, dynamic, switch):
    """Every third block-table entry out of range (and block 0, never live here): the kernel that
    `switch` = "1" selects against the one "0" selects (no weight for those tokens in either); with
    dynamic scales the slots of row 0, which dead tokens read, hold NaN (they must not reach the sum)."""
    q, k_cache, v_cache, k_scale, v_scale, table, seq_lens, sm_scale = args
    nb = k_cache.shape[0]
    bad = table.clone()
    bad[:, ::3] = nb + 5
    bad[bad == 0] = nb + 5
    if dynamic:
        k_scale[0, 0].fill_(float("nan"))
        v_scale[0, 0].fill_(float("nan"))
    mine = impl("int8_kv_decode_attention", q, k_cache, v_cache, k_scale, v_scale, bad, seq_lens, sm_scale)
    monkeypatch.setenv(switch, "0")
    theirs = impl("int8_kv_decode_attention", q, k_cache, v_cache, k_scale, v_scale, bad, seq_lens, sm_scale)
    monkeypatch.setenv(switch, "1")
    _lowp_close(mine, theirs.float().to(dtype), theirs)


@pytest.mark.parametrize("dtype", FLOATS[:2])
def test_int8_kv_decode_attention_mma(impl, dtype, monkeypatch):
    """PTQRT_CUDA_DECODE_MMA=1: the tensor-core kernel (kernels/decode_mma.cuh; fp16 / bf16 queries, D 64
    or 128, dynamic scales) against the reference: one query head a kv head (one of its 16 rows), groups
    of 2, 4, 12 and 16, 20 (two CTAs a kv head), partial tiles, a length-0 sequence, several splits,
    a block size of 7; against the streaming kernel where blocks are unreadable (no weight in either),
    with NaN scales in the rows those dead tokens read. Static scales and D = 96 keep the other kernels."""
    monkeypatch.setenv("PTQRT_CUDA_DECODE_MMA", "1")
    cases = [(2, 4, 4, 128, 12, 16, 6, [37, 96]), (3, 4, 2, 64, 10, 8, 8, [0, 61, 5]), (1, 8, 2, 128, 40, 16, 40, [600]),
             (2, 24, 2, 64, 10, 8, 8, [45, 3]), (1, 16, 1, 128, 6, 16, 4, [50]), (1, 20, 1, 64, 6, 16, 4, [33]),
             (2, 2, 2, 128, 12, 7, 5, [30, 35]), (1, 2, 1, 96, 4, 16, 4, [40])]
    if not impl.small:
        cases += [(16, 32, 32, 128, 4200, 16, 256, [4096] * 16), (1, 32, 8, 128, 300, 16, 256, [4096]),
                  (4, 64, 8, 64, 2100, 16, 512, [8192, 1, 0, 5000])]
    for case in cases:
        _check_dead_blocks(impl, monkeypatch, _check_decode(impl, case, dtype, True), dtype, True,
                           "PTQRT_CUDA_DECODE_MMA")
    for case in cases[:2]:  # static scales: the other kernels
        _check_decode(impl, case, dtype, False)


@pytest.mark.parametrize("kernel", ("default", "two-phase", "mma"))
def test_int8_kv_decode_attention_nan(impl, kernel, monkeypatch):
    """A NaN in q, or in one token's K or V scale (what append stores for a NaN token), reaches the
    affected heads' output as NaN, as in the reference, with one split or several (the emulator's 8
    SMs split 600 tokens): a NaN split or sum is not taken for an empty one."""
    monkeypatch.setenv("PTQRT_CUDA_DECODE_STREAM", "0" if kernel == "two-phase" else "1")
    monkeypatch.setenv("PTQRT_CUDA_DECODE_MMA", "1" if kernel == "mma" else "0")
    dev = impl.device
    for b, hq, hkv, d, nb, bs, maxb, lens in ((1, 4, 2, 64, 8, 16, 6, [70]), (1, 8, 2, 128, 40, 16, 40, [600])):
        k_cache, v_cache = rand_int8(nb, bs, hkv, d, device=dev), rand_int8(nb, bs, hkv, d, device=dev)
        k_scale, v_scale = _kv_scales(nb, bs, hkv, d, True, dev)
        q = _rand((b, hq, d), torch.float16, dev)
        table = torch.randperm(nb, device=dev)[:maxb][None].to(torch.int32)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        qn, ksn, vsn = q.clone(), k_scale.clone(), v_scale.clone()
        qn[0, 1, 3] = float("nan")
        ksn[table[0, 2], 5, 0] = float("nan")
        vsn[table[0, 3], 1, 1] = float("nan")
        for args in ((qn, k_cache, v_cache, k_scale, v_scale), (q, k_cache, v_cache, ksn, v_scale),
                     (q, k_cache, v_cache, k_scale, vsn)):
            out = impl("int8_kv_decode_attention", *args, table, seq_lens, 1.0 / math.sqrt(d))
            expect = ref.int8_kv_decode_attention(*args, table, seq_lens, 1.0 / math.sqrt(d))
            assert expect.isnan().any()
            assert torch.equal(out.isnan().cpu(), expect.isnan().cpu()), (kernel, lens)


@pytest.mark.parametrize("kernel", ("default", "two-phase", "mma"))
def test_int8_kv_decode_attention_grid_pieces(impl, kernel, monkeypatch):
    """Decode grids past the limits (gridDim.y and .z <= 65535, .x < 2^31) run in pieces, each launch's
    pointers offset to its first sequence, kv head and query head, bit for bit the one-launch result. In
    the emulator the limits are lowered: PTQRT_EMU_GRID_YZ=2 puts B = 5 in pieces of 2 sequences, Hkv = 3
    (one sequence a piece) in pieces of 2 kv heads, and groups of 20 and 40 query heads (3-5 CTAs of 8 or
    16 heads, one sequence and kv head a piece) in pieces of 16 or 32 heads; PTQRT_EMU_GRID_X=16 (the
    combine kernel's B * Hq CTAs) makes pieces of 4 sequences, and of 16 query heads where Hq > 16.
    Several splits throughout (the combine kernel runs a piece at a time too). On a GPU B passes 65535."""
    monkeypatch.setenv("PTQRT_CUDA_DECODE_STREAM", "0" if kernel == "two-phase" else "1")
    monkeypatch.setenv("PTQRT_CUDA_DECODE_MMA", "1" if kernel == "mma" else "0")
    dtype = {"default": torch.bfloat16, "two-phase": torch.float32, "mma": torch.float16}[kernel]
    dev = impl.device
    cases = [(5, 4, 2, 64, 16, 16, 12, [37, 0, 191, 5, 130]), (2, 6, 3, 64, 16, 16, 12, [150, 77]),
             (2, 20, 1, 64, 16, 16, 12, [150, 33]), (1, 40, 1, 128, 16, 16, 12, [100])]
    limits = [("PTQRT_EMU_GRID_YZ", "2"), ("PTQRT_EMU_GRID_X", "16")]
    if not impl.emu:
        cases, limits = [(65537, 2, 1, 64, 64, 16, 2, [20] * 65537)], [(None, None)]
    for case in cases:
        b, hq, hkv, d, nb, bs, maxb, lens = case
        k_cache, v_cache = rand_int8(nb, bs, hkv, d, device=dev), rand_int8(nb, bs, hkv, d, device=dev)
        k_scale, v_scale = _kv_scales(nb, bs, hkv, d, True, dev)
        q = _rand((b, hq, d), dtype, dev)
        table = torch.randint(0, nb, (b, maxb), dtype=torch.int32, device=dev)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        args = (q, k_cache, v_cache, k_scale, v_scale, table, seq_lens, 1.0 / math.sqrt(d))
        if impl.emu:
            whole = impl("int8_kv_decode_attention", *args)
            expect = ref.int8_kv_decode_attention(*args)
            _lowp_close(whole, expect, expect)
        else:  # each part within the limit: one launch (the split count is 1 in all three at this B)
            cut = 65535
            whole = torch.cat([impl("int8_kv_decode_attention", q[:cut], *args[1:5], table[:cut], seq_lens[:cut],
                                    args[7]),
                               impl("int8_kv_decode_attention", q[cut:], *args[1:5], table[cut:], seq_lens[cut:],
                                    args[7])])
        for name, value in limits:
            if name is not None:
                monkeypatch.setenv(name, value)
            _poison_pool((b, hq, d), dtype, dev)
            out = impl("int8_kv_decode_attention", *args)
            if name is not None:
                monkeypatch.delenv(name)
            assert torch.equal(out, whole), (kernel, case[:4], name)


def test_int8_kv_decode_attention_mma_fp16_small_v(impl, monkeypatch):
    """PTQRT_CUDA_DECODE_MMA=1 in fp16 with |V| near 1e-3 (dynamic scales near 1e-5): P V's A operand
    carries p * scale * 64, out of fp16's subnormals, so the error stays within 2x the output's own
    rounding (without the factor: ~17x)."""
    monkeypatch.setenv("PTQRT_CUDA_DECODE_MMA", "1")
    dev = impl.device
    torch.manual_seed(0)
    nb, bs, n, hkv, d = 16, 16, 256, 1, 64
    k, v = torch.randn(n, hkv, d), torch.randn(n, hkv, d) * 1e-3
    kc, vc = torch.zeros(nb, bs, hkv, d, dtype=torch.int8), torch.zeros(nb, bs, hkv, d, dtype=torch.int8)
    ks, vs = torch.zeros(nb, bs, hkv), torch.zeros(nb, bs, hkv)
    ref.kv_cache_append(k, v, kc, vc, ks, vs, torch.arange(n))
    bt, sl = torch.arange(nb, dtype=torch.int32)[None], torch.tensor([n], dtype=torch.int32)
    q = torch.randn(1, 4, d).half()
    args = [t.to(dev) for t in (q, kc, vc, ks, vs, bt, sl)]
    out = impl("int8_kv_decode_attention", *args, 0.125).float().cpu()
    expect = ref.int8_kv_decode_attention(q.float(), kc, vc, ks, vs, bt, sl, 0.125)
    rounding = ((expect.half().float() - expect).norm() / expect.norm()).item()
    assert ((out - expect).norm() / expect.norm()).item() < 2 * rounding


# ------------------------------------------------------------------------------------------ unaligned storage
def _offset_view(t: torch.Tensor, elems: int = 1) -> torch.Tensor:
    """A contiguous copy of t that starts `elems` elements into its storage (not 16-byte aligned)."""
    flat = torch.empty(t.numel() + elems, dtype=t.dtype, device=t.device)
    v = flat[elems:].view(t.shape)
    v.copy_(t)
    return v


def test_unaligned_inputs_take_the_safe_paths(impl):
    """Contiguous tensors that do not start 16-byte aligned (views into a storage) must not reach the
    vector loads: w8a8 pads a copy, w8a16 and quantize fall back to element loads, the decode kernel to
    byte loads."""
    dev = impl.device
    m, n, k = 20, 40, 64
    x_q, w_q = rand_int8(m, k, device=dev), rand_int8(n, k, device=dev)
    xs, ws = rand_scale(m, device=dev), rand_scale(n, device=dev)
    y = impl("w8a8_gemm", _offset_view(x_q), xs, _offset_view(w_q), ws, None, torch.float32)
    assert torch.equal(y, ref.w8a8_gemm(x_q, xs, w_q, ws, None, torch.float32))
    for mm in (3, 20):
        x = _rand((mm, k), torch.float16, dev)
        y = impl("w8a16_gemm", _offset_view(x), _offset_view(w_q, 3), ws, None, 0)
        expect = ref.w8a16_gemm(x, w_q, ws, None, 0)
        _lowp_close(y, expect, (x @ ref.dequantize_weight(w_q, ws).to(torch.float16).T))
    x = _rand((5, k), torch.bfloat16, dev)
    q, s = impl("quantize_per_token", _offset_view(x), None)
    q_ref, s_ref = ref.quantize_per_token(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    nb, bs, h, d = 4, 8, 2, 64
    kc, vc = rand_int8(nb, bs, h, d, device=dev), rand_int8(nb, bs, h, d, device=dev)
    ks, vs = _kv_scales(nb, bs, h, d, True, dev)
    q = _rand((2, 4, d), torch.float32, dev)
    table = torch.stack([torch.randperm(nb, device=dev) for _ in range(2)]).to(torch.int32)
    lens = torch.tensor([30, 7], dtype=torch.int32, device=dev)
    out = impl("int8_kv_decode_attention", q, _offset_view(kc), _offset_view(vc, 5), ks, vs, table, lens, 0.125)
    _lowp_close(out, ref.int8_kv_decode_attention(q, kc, vc, ks, vs, table, lens, 0.125),
                ref.int8_kv_decode_attention(q, kc, vc, ks, vs, table, lens, 0.125))


# ------------------------------------------------------------------------------------------ host checks
def test_host_glue_refuses_bad_input_with_shapes():
    """The C++ glue checks what guards memory (it is reachable without ptqrt's Python checks)."""
    _emu_ready()
    emu = getattr(torch.ops, EMU_NS)
    x_q, w_q = rand_int8(4, 32), rand_int8(8, 48)
    with pytest.raises(RuntimeError, match=r"x_q is \[M, K\] = \[4, 32\].*w_q is \[N, K\] = \[8, 48\]"):
        emu.w8a8_gemm(x_q, torch.ones(4), w_q, torch.ones(8), None, torch.float16)
    with pytest.raises(RuntimeError, match=r"x_q must be contiguous.*shape \[32, 4\]"):
        emu.w8a8_gemm(rand_int8(4, 32).T, torch.ones(32), rand_int8(8, 4), torch.ones(8), None, torch.float16)
    with pytest.raises(RuntimeError, match=r"w_scale must have dtype Float"):
        emu.w8a16_gemm(torch.randn(2, 32), rand_int8(8, 32), torch.ones(8, dtype=torch.float16), None, 0)
    with pytest.raises(RuntimeError, match=r"k_scale must be \[num_blocks, block_size, Hkv\]"):
        emu.kv_cache_append(torch.randn(1, 2, 8), torch.randn(1, 2, 8), rand_int8(3, 4, 2, 8), rand_int8(3, 4, 2, 8),
                            torch.ones(5), torch.ones(2, 8), torch.zeros(1, dtype=torch.int64))


def test_kv_cache_append_skips_out_of_range_slots():
    """A slot past the cache would write out of bounds: skipped, like a negative (padding) slot."""
    _emu_ready()
    emu = getattr(torch.ops, EMU_NS)
    k_cache, v_cache = rand_int8(2, 4, 1, 16), rand_int8(2, 4, 1, 16)
    before = (k_cache.clone(), v_cache.clone())
    scales = [rand_scale(8).reshape(2, 4, 1) for _ in range(2)]
    emu.kv_cache_append(torch.randn(2, 1, 16), torch.randn(2, 1, 16), k_cache, v_cache, *scales,
                        torch.tensor([8, -3], dtype=torch.int64))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


# ------------------------------------------------------------------------------------------ tune
def test_tune_decision_picks_fastest_and_skips_reference():
    from ptqrt import tune

    timings = {
        "w8a8_gemm": {1: {"triton": 0.020, "cuda": 0.010, "reference": 0.001},
                      16: {"triton": 0.012, "cuda": 0.0121},
                      64: {"triton": None, "cuda": 0.5},            # triton failed at this size
                      256: {"triton": float("nan"), "cuda": None}},  # nothing measurable: default
        "kv_cache_append": {1: {"reference": 0.3}},                  # nothing else: reference it is
    }
    table = tune.decide(timings)
    assert table["w8a8_gemm"] == {"1": "cuda", "16": "triton", "64": "cuda", "256": "triton"}
    assert table["kv_cache_append"] == {"1": "reference"}
    # Within the tie margin the incumbent default (triton) keeps the bucket.
    assert tune.decide({"w8a16_gemm": {1: {"triton": 1.0, "cuda": 0.995}}}, tie=0.01)["w8a16_gemm"]["1"] == "triton"


def test_tune_table_round_trip(tmp_path, monkeypatch):
    """A table written from fake timings is what the auto chooser reads back for this GPU name."""
    from ptqrt import dispatch_table, tune

    monkeypatch.setenv("PTQRT_TABLE_DIR", str(tmp_path))
    monkeypatch.setattr(dispatch_table, "current_gpu_name", lambda: "Fake GPU 80GB")
    timings = {op: {b: {"triton": 2.0, "cuda": 1.0 if b <= 16 else 3.0} for b in ops.M_BUCKETS} for op in ops.OP_NAMES}
    path = tune.write(timings, "Fake GPU 80GB")
    assert path == dispatch_table.table_path("Fake GPU 80GB") and path.is_file()
    data = json.loads(path.read_text())
    assert data["device"] == "Fake GPU 80GB" and set(data["ops"]) == set(ops.OP_NAMES)
    ops.reset_dispatch_table()
    try:
        for op in ops.OP_NAMES:
            assert ops._auto_chain(op, torch.device("cuda"), 1)[0] == "cuda"
            assert ops._auto_chain(op, torch.device("cuda"), 16)[0] == "cuda"
            assert ops._auto_chain(op, torch.device("cuda"), 17)[0] == "triton"
            assert ops._auto_chain(op, torch.device("cuda"), 10**6)[0] == "triton"
    finally:
        monkeypatch.undo()
        ops.reset_dispatch_table()


def test_tune_eager_timing_and_copies(monkeypatch):
    """Eager mode times back-to-back calls over rotating input copies (enough to exceed 2x the L2),
    every copy used, compile/autotune calls outside the timing; an unknown mode is refused."""
    from ptqrt import tune

    assert tune.copies_for(16 << 20, 50 << 20) == 7 and tune.copies_for(1 << 30, 50 << 20) == 1
    assert tune.copies_for(1, 50 << 20) == tune.MAX_COPIES and tune.copies_for(0, 50 << 20) == 1
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    seen = []
    sets = [(torch.zeros(4) + i,) for i in range(3)]
    ms = tune._time_eager(lambda x: seen.append(int(x[0])), sets, quick=True, target_ms=0.05)
    assert ms > 0 and set(seen) == {0, 1, 2} and len(seen) > 2 * len(sets)
    with pytest.raises(ValueError, match="mode must be one of eager, kernel"):
        tune.tune(mode="graph")


def test_tune_kernel_timing_is_the_bench_timing(monkeypatch):
    """Kernel mode times each call as `ptqrt bench` does (bench_gpu._bench: one untimed call, L2
    flushed by a read), shorter in quick mode."""
    from ptqrt import bench_gpu, tune

    calls = []
    monkeypatch.setattr(bench_gpu, "_bench",
                        lambda fn, rep_ms=40, warmup_ms=10: calls.append((fn(), rep_ms, warmup_ms)) or 1.5)
    assert tune._time(lambda a: a + 1, (1,), quick=True) == 1.5
    assert tune._time(lambda a: a + 1, (2,), quick=False) == 1.5
    assert calls == [(2, 20, 5), (3, 80, 20)]


def test_tune_without_gpu_says_so():
    from ptqrt import tune

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        tune.tune(quick=True)


@pytest.mark.gpu
def test_tune_quick_on_gpu(tmp_path, monkeypatch):
    from ptqrt import dispatch_table, tune

    monkeypatch.setenv("PTQRT_TABLE_DIR", str(tmp_path))
    path = tune.tune(ops=["quantize_per_token"], quick=True)
    data = json.loads(Path(path).read_text())
    assert data["device"] == torch.cuda.get_device_name()
    assert set(data["ops"]["quantize_per_token"]) == {str(b) for b in ops.M_BUCKETS}
    assert path == dispatch_table.table_path(torch.cuda.get_device_name())
    ops.reset_dispatch_table()


def test_shipped_table_for_a_gpu_name(tmp_path, monkeypatch):
    """Order: the table tuned here, then one shipped for this GPU name, then the shipped default."""
    from ptqrt import dispatch_table

    monkeypatch.setenv("PTQRT_TABLE_DIR", str(tmp_path / "tuned"))
    monkeypatch.setattr(dispatch_table, "SHIPPED", tmp_path / "shipped")
    monkeypatch.setattr(dispatch_table, "current_gpu_name", lambda: "Fake GPU 80GB")
    default = json.loads(dispatch_table.DEFAULT.read_text())["ops"]
    assert dispatch_table.load_table() == default
    shipped = {"w8a8_gemm": {"1": "cuda"}}
    dispatch_table.SHIPPED.mkdir()
    dispatch_table.shipped_path("Fake GPU 80GB").write_text(json.dumps({"device": "Fake GPU 80GB", "ops": shipped}))
    assert dispatch_table.load_table() == shipped
    tuned = {"w8a8_gemm": {"1": "triton"}}
    dispatch_table.write_table("Fake GPU 80GB", tuned)
    assert dispatch_table.load_table() == tuned
