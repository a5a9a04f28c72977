"""W8A8 GEMM: int8 x int8 tensor-core dots into an exact int32 accumulator, dequant fused.

    y[m, n] = (float32(acc[m, n]) * x_scale[m]) * w_scale[n] + bias[n], cast to out_dtype
    acc[m, n] = sum_k x_q[m, k] * w_q[n, k]   (int32, exact for K <= ptqrt.reference.MAX_K_INT32)

    x_q int8 [M, K] row-major; w_q int8 [N, K] row-major (the nn.Linear layout, K contiguous, which
    is the K-major B operand that int8 MMA/WGMMA wants); x_scale float32 [M] (per token) or [1]
    (static per tensor); w_scale float32 [N]; bias [N] any float dtype or None.
    out_dtype float16/bfloat16/float32, or int32 for the raw accumulator (bit-exact, no epilogue).

Two kernels:
  * ``_w8a8_gemm_kernel`` (M > 16): the tiled GEMM of Triton tutorial 03 with grouped program
    ordering (GROUP_M row tiles share each column of W while it is in L2), autotuned per M bucket.
    ``_w8a8_gemm_tma_kernel`` is its twin on sm_90 from M = 2048 (TMA_MIN_M; PTQRT_TRITON_TMA=1 for
    every M, =0 never): x and w tiles through TMA tensor descriptors (no address arithmetic,
    out-of-bounds parts zero-filled), one program per SM looping over the tiles in the same grouped
    order, the tile loop flattened into the K loop so the compiler's pipeline runs across tile
    boundaries (the next tile's loads under this tile's epilogue). Needs K % 16 == 0, 16-byte aligned
    operands and an fp16 / bf16 output; other calls take the pointer kernel.
  * ``_w8a8_gemv_kernel`` (M <= 16, where torch._int_mm refuses to run): swap-AB, so the weight
    tile [BLOCK_N, BLOCK_K] is the wide MMA operand and the <= 16 activation rows the narrow one;
    the kernel streams W once. When N alone gives too few tiles to fill the GPU, K is split: each
    split stores its int32 partial tile, and the program that finishes a tile last (an int32
    counter per tile) sums the partials in split order and runs the epilogue, so the result stays
    exact and deterministic without a second launch.

The epilogue is compiled without FMA contraction (``enable_fp_fusion=False``): (acc * xs) * ws + b
is then rounded exactly as the reference rounds it, so float outputs match it bit for bit too.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._common import cast_out

GEMV_MAX_M = 16
MAX_SPLIT_K = 8  # also the size of the partials buffer, in splits


@triton.jit
def _epilogue_store(acc, m_idx, n_idx, M, N, c_ptr, stride_cm, xs_ptr, ws_ptr, bias_ptr,
                    PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr):
    """Store acc (int32) at out[m_idx, n_idx]; m_idx and n_idx broadcast to acc's shape."""
    mask = (m_idx < M) & (n_idx < N)
    c_ptrs = c_ptr + m_idx.to(tl.int64) * stride_cm + n_idx
    if OUT_INT32:
        tl.store(c_ptrs, acc, mask=mask)
    else:
        if PER_TOKEN:
            xs = tl.load(xs_ptr + m_idx, mask=m_idx < M, other=0.0)
        else:
            xs = tl.load(xs_ptr)
        ws = tl.load(ws_ptr + n_idx, mask=n_idx < N, other=0.0)
        y = acc.to(tl.float32) * xs
        y = y * ws
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + n_idx, mask=n_idx < N, other=0.0).to(tl.float32)
        tl.store(c_ptrs, cast_out(y, c_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _w8a8_gemm_kernel(a_ptr, b_ptr, c_ptr, xs_ptr, ws_ptr, bias_ptr, M, N, K,
                      stride_am, stride_bn, stride_cm, M_BUCKET,
                      PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    pid_m, pid_n = _common.grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped rather than masked rows/columns: the K loop's loads need no M/N mask; the duplicated
    # rows and columns are computed but never stored.
    ram = (offs_m % M).to(tl.int64)
    rbn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + ram[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + rbn[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] view of W^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc=acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    _epilogue_store(acc, offs_m[:, None], offs_n[None, :], M, N, c_ptr, stride_cm, xs_ptr, ws_ptr, bias_ptr,
                    PER_TOKEN, HAS_BIAS, OUT_INT32)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _w8a8_gemm_tma_kernel(a_desc, b_desc, c_ptr, xs_ptr, ws_ptr, bias_ptr, M, N, K, stride_cm, M_BUCKET,
                          PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr):
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles, NUM_SMS, flatten=True):
        pid_m, pid_n = _common.grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for kt in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, kt * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, kt * BLOCK_K])
            acc = tl.dot(a, b.T, acc=acc, out_dtype=tl.int32)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _epilogue_store(acc, offs_m[:, None], offs_n[None, :], M, N, c_ptr, stride_cm, xs_ptr, ws_ptr, bias_ptr,
                        PER_TOKEN, HAS_BIAS, OUT_INT32)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _w8a8_gemv_kernel(a_ptr, b_ptr, c_ptr, xs_ptr, ws_ptr, bias_ptr, part_ptr, cnt_ptr, M, N, K,
                      stride_am, stride_bn, stride_cm, M_BUCKET,
                      PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    rbn = (offs_n % N).to(tl.int64)
    ram = offs_m % M  # rows past M repeat row 0..; they are never stored
    offs_k = tl.arange(0, BLOCK_K)
    k_start, k_stop = _common.split_k_range(pid_k, K, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        w, x = _common.dot_operands(b_ptr, a_ptr, rbn, ram, stride_bn, stride_am, k0 + offs_k, K, EVEN_K)
        acc = tl.dot(w, x, acc=acc, out_dtype=tl.int32)
    m_idx = offs_m[None, :]
    n_idx = offs_n[:, None]
    if SPLIT_K == 1:
        _epilogue_store(acc, m_idx, n_idx, M, N, c_ptr, stride_cm, xs_ptr, ws_ptr, bias_ptr,
                        PER_TOKEN, HAS_BIAS, OUT_INT32)
    else:
        # part: int32 [SPLIT_K, BLOCK_M, N]
        if _common.split_k_arrive(acc, part_ptr, cnt_ptr, pid_k, pid_n, m_idx, n_idx, N, BLOCK_M, SPLIT_K):
            total = _common.split_k_sum(part_ptr, cnt_ptr, pid_n, m_idx, n_idx, N, BLOCK_M, BLOCK_N, SPLIT_K)
            _epilogue_store(total, m_idx, n_idx, M, N, c_ptr, stride_cm, xs_ptr, ws_ptr, bias_ptr,
                            PER_TOKEN, HAS_BIAS, OUT_INT32)


_gemm = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_w8a8_gemm_kernel)
_gemv = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_w8a8_gemv_kernel)


def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) per M size class. Tiles of 64+ rows with 4 or 8 warps
# map onto Hopper's int8 WGMMA; shared memory per stage is (BLOCK_M + BLOCK_N) * BLOCK_K bytes,
# at most 48 KB here, so 3-4 stages fit in 227 KB.
GEMM_CONFIGS = {
    64: [_cfg(32, 64, 256, 4, 4), _cfg(64, 64, 256, 4, 4), _cfg(64, 128, 128, 4, 4), _cfg(64, 128, 256, 4, 3)],
    256: [_cfg(64, 128, 128, 4, 4), _cfg(128, 128, 128, 8, 3), _cfg(64, 256, 128, 8, 3), _cfg(128, 64, 128, 4, 4)],
    # 64-row tiles too: at M = 512 the 128 x 128 tiles of a 4096-wide N are one CTA per SM for the
    # whole (long) K, which leaves each SM's tensor cores waiting on one CTA's loads (1.06x _int_mm
    # at 512 x 4096 x 11008 on an H100); 64-row tiles run two CTAs per SM.
    1024: [_cfg(128, 128, 128, 8, 3), _cfg(128, 256, 128, 8, 3), _cfg(128, 128, 128, 4, 4), _cfg(256, 128, 128, 8, 3),
           _cfg(64, 128, 128, 4, 4), _cfg(64, 256, 128, 8, 3)],
    1 << 62: [_cfg(128, 256, 128, 8, 3), _cfg(256, 128, 128, 8, 3), _cfg(128, 256, 128, 8, 4),
              _cfg(128, 128, 128, 8, 4)],
}
# One config per class when not autotuning (a GPU with PTQRT_TRITON_AUTOTUNE=0).
GEMM_DEFAULT = {64: _cfg(64, 128, 128, 4, 4), 256: _cfg(128, 128, 128, 8, 3), 1024: _cfg(128, 256, 128, 8, 3),
                1 << 62: _cfg(128, 256, 128, 8, 3)}


def _gemv_cfg(bn, bk, split, warps, stages):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, num_warps=warps, num_stages=stages)


def _tma_blocks(nargs):
    """Autotuner pre_hook: the descriptors' box shapes follow the config's tile."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["b_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _tma_cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages, pre_hook=_tma_blocks)


# The TMA kernel's configs per M size class: the pointer kernel's shapes (one program per SM, so no
# 64-row tiles to get two programs an SM), and one fixed config each for untuned launches.
TMA_CONFIGS = {
    64: [_tma_cfg(64, 128, 128, 4, 4), _tma_cfg(64, 64, 256, 4, 4), _tma_cfg(64, 256, 128, 4, 3)],
    256: [_tma_cfg(128, 128, 128, 8, 3), _tma_cfg(64, 256, 128, 8, 3), _tma_cfg(64, 128, 128, 4, 4)],
    1024: [_tma_cfg(128, 128, 128, 8, 3), _tma_cfg(128, 256, 128, 8, 3), _tma_cfg(128, 128, 128, 8, 4)],
    1 << 62: [_tma_cfg(128, 256, 128, 8, 3), _tma_cfg(128, 256, 128, 8, 4), _tma_cfg(256, 128, 128, 8, 3),
              _tma_cfg(128, 128, 128, 8, 4)],
}
TMA_DEFAULT = {64: _tma_cfg(64, 128, 128, 4, 4), 256: _tma_cfg(128, 128, 128, 8, 3),
               1024: _tma_cfg(128, 256, 128, 8, 3), 1 << 62: _tma_cfg(128, 256, 128, 8, 3)}


# Memory-bound: 8-16 KB weight tiles, 3-4 stages deep, keep enough bytes in flight per SM to reach
# HBM bandwidth; the narrow tiles give N / 16 programs, the wide ones rely on split-K.
GEMV_CONFIGS = [_gemv_cfg(bn, bk, s, 4, st)
                for (bn, bk, st) in ((16, 512, 4), (32, 256, 4), (64, 256, 3), (128, 128, 3)) for s in (1, 2, 4, 8)]
GEMV_DEFAULT = triton.Config(dict(BLOCK_N=32, BLOCK_K=256), num_warps=4, num_stages=4)  # SPLIT_K by heuristic


def prune_gemv_configs(configs, named_args, **kwargs):
    """Time split-K configs only where they can help (_common.keep_split)."""
    n, k = named_args["N"], named_args["K"]
    sms = _common.num_sms(named_args["b_ptr"].device)
    keep = [c for c in configs if _common.keep_split(_common.cdiv(n, c.kwargs["BLOCK_N"]), c.kwargs["SPLIT_K"], k,
                                                     c.kwargs["BLOCK_K"], sms)]
    return keep


# Launch parameters under the interpreter: small tiles keep the CPU emulation quick; tests set
# SPLIT_K to exercise the split path.
INTERPRET = {"gemm": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2), "gemv": dict(BLOCK_N=16, BLOCK_K=32)}


# The TMA kernel is the default on sm_90 from this M: on an H100 it ran 1.00-1.09x the pointer kernel
# at M >= 2048 and 0.86-0.89x at M = 512 (bench/NOTES.md).
TMA_MIN_M = 2048


def tma_enabled(m: int, on_sm90: bool) -> bool:
    """PTQRT_TRITON_TMA=1: the TMA kernel for every M > 16 where it applies (the interpreter too); =0:
    never; unset or empty: on an sm_90 GPU (where it was measured) from TMA_MIN_M rows."""
    env = os.environ.get("PTQRT_TRITON_TMA", "")
    if env not in ("", "0", "1"):
        raise ValueError(f"PTQRT_TRITON_TMA must be '1' (on) or '0' (off); got {env!r}")
    if env:
        return env == "1"
    return on_sm90 and m >= TMA_MIN_M


def _tma_applies(x_q: torch.Tensor, w_q: torch.Tensor, k: int, out_dtype: torch.dtype) -> bool:
    """Tensor descriptors need 16-byte aligned bases and row strides (K % 16 == 0) and a non-empty K.
    fp16 / bf16 outputs only: a 4-byte output tile, staged in shared memory for its store, does not
    fit beside the 128 x 256 tiles' ring (278,552 bytes; ptqrt.kernels.compile_check). TMA is sm_90's:
    older GPUs keep the pointer kernel (the interpreter runs it on the CPU)."""
    if out_dtype not in (torch.float16, torch.bfloat16) or (x_q.is_cuda and _common.capability_major(x_q.device) < 9):
        return False
    rows_ok = all(t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (x_q, w_q))
    return k > 0 and k % 16 == 0 and rows_ok


def _size_class(m: int) -> int:
    return next(c for c in GEMM_CONFIGS if m <= c)


_TUNE = dict(do_bench=_common.bench_fn)
_gemm_tuned = {c: triton.autotune(cfgs, key=["M_BUCKET", "N", "K"], **_TUNE)(_gemm) for c, cfgs in GEMM_CONFIGS.items()}
_tma_tuned = {c: triton.autotune(cfgs, key=["M_BUCKET", "N", "K"], **_TUNE)(_w8a8_gemm_tma_kernel)
              for c, cfgs in TMA_CONFIGS.items()}
_gemv_tuned = triton.autotune(GEMV_CONFIGS, key=["M_BUCKET", "N", "K"],
                              prune_configs_by={"early_config_prune": prune_gemv_configs}, **_TUNE)(_gemv)


def default_gemv_split(n: int, k: int, block_n: int, block_k: int, sms: int) -> int:
    """Splits (untuned launches) that bring cdiv(N, BLOCK_N) tiles up to about one wave."""
    tiles = _common.cdiv(n, block_n)
    s = 1
    while s < MAX_SPLIT_K and tiles * s * 2 <= sms and k >= 2 * s * block_k:
        s *= 2
    return s


@_common.on_input_device
def w8a8_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y [M, N] = (x_q [M, K] @ w_q [N, K]^T in int32) * x_scale * w_scale[n] + bias[n] in out_dtype.

    Inputs validated and contiguous (ptqrt._checks); x_scale [M] or [1]; out_dtype=torch.int32 returns
    the raw accumulator. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    """
    m, k = x_q.shape
    n = w_q.shape[0]
    out = _common.alloc((m, n), out_dtype, x_q.device)
    if m == 0 or n == 0:
        return out
    flags = dict(PER_TOKEN=x_scale.numel() != 1, HAS_BIAS=bias is not None, OUT_INT32=out_dtype == torch.int32)
    bias_arg = bias if bias is not None else w_scale  # never read when HAS_BIAS is False
    head = (x_q, w_q, out, x_scale, w_scale, bias_arg)
    shape = (m, n, k, x_q.stride(0), w_q.stride(0), out.stride(0), _common.m_bucket(m))
    tune = _common.autotuning(x_q)
    if m <= GEMV_MAX_M:
        skey = _common.stream_key(x_q.device)  # one stream lookup for both buffers
        counters = _common.tile_counters(x_q.device, _common.cdiv(n, 16), skey)
        # Partials of every split: int32 [SPLIT_K, 16, N]; uninitialised, each split writes its own.
        part = _common.scratch(x_q.device, MAX_SPLIT_K * GEMV_MAX_M * n, torch.int32, "gemv", skey)
        args = head + (part, counters) + shape
        if tune:
            grid = lambda meta: (_common.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
            _gemv_tuned[grid](*args, BLOCK_M=GEMV_MAX_M, enable_fp_fusion=False, **flags)
        else:
            if _common.interpreting():
                meta, warps, stages = dict(INTERPRET["gemv"]), 4, 1
            else:
                meta, warps, stages = dict(GEMV_DEFAULT.kwargs), GEMV_DEFAULT.num_warps, GEMV_DEFAULT.num_stages
            meta.setdefault("SPLIT_K", default_gemv_split(n, k, meta["BLOCK_N"], meta["BLOCK_K"],
                                                          _common.num_sms(x_q.device)))
            assert meta["SPLIT_K"] <= MAX_SPLIT_K, meta
            grid = (_common.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
            _gemv[grid](*args, BLOCK_M=GEMV_MAX_M, enable_fp_fusion=False, num_warps=warps, num_stages=stages,
                        **flags, **meta)
        return out
    sm90 = x_q.is_cuda and _common.capability_major(x_q.device) == 9
    if tma_enabled(m, sm90) and _tma_applies(x_q, w_q, k, out_dtype):
        _launch_tma(x_q, w_q, out, x_scale, w_scale, bias_arg, m, n, k, tune, flags)
        return out
    args = head + shape
    if tune:
        grid = lambda meta: (_common.cdiv(m, meta["BLOCK_M"]) * _common.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _gemm_tuned[_size_class(m)][grid](*args, enable_fp_fusion=False, **flags)
    else:
        if _common.interpreting():
            meta, warps, stages = INTERPRET["gemm"], 4, 1
        else:
            cfg = GEMM_DEFAULT[_size_class(m)]
            meta, warps, stages = cfg.kwargs, cfg.num_warps, cfg.num_stages
        grid = (_common.cdiv(m, meta["BLOCK_M"]) * _common.cdiv(n, meta["BLOCK_N"]),)
        _gemm[grid](*args, enable_fp_fusion=False, num_warps=warps, num_stages=stages, **flags, **meta)
    return out


def _launch_tma(x_q, w_q, out, x_scale, w_scale, bias_arg, m: int, n: int, k: int, tune: bool, flags: dict) -> None:
    """The TMA kernel on min(tiles, SMs) programs (descriptor boxes set from the config: by the
    autotuner's pre_hook, or here for a fixed config)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    sms = _common.num_sms(x_q.device)
    # Placeholder boxes; every launch sets them from its config first.
    a_desc = TensorDescriptor(x_q, [m, k], list(x_q.stride()), [16, 16])
    b_desc = TensorDescriptor(w_q, [n, k], list(w_q.stride()), [16, 16])
    args = (a_desc, b_desc, out, x_scale, w_scale, bias_arg, m, n, k, out.stride(0), _common.m_bucket(m))

    def grid(meta):
        return (min(sms, _common.cdiv(m, meta["BLOCK_M"]) * _common.cdiv(n, meta["BLOCK_N"])),)

    if tune:
        _tma_tuned[_size_class(m)][grid](*args, NUM_SMS=sms, enable_fp_fusion=False, **flags)
        return
    if _common.interpreting():
        meta, warps, stages = INTERPRET["gemm"], 4, 1
    else:
        cfg = TMA_DEFAULT[_size_class(m)]
        meta, warps, stages = cfg.kwargs, cfg.num_warps, cfg.num_stages
    _tma_blocks({"a_desc": a_desc, "b_desc": b_desc, **meta})
    _w8a8_gemm_tma_kernel[grid(meta)](*args, NUM_SMS=sms, enable_fp_fusion=False, num_warps=warps,
                                      num_stages=stages, **flags, **meta)
