"""W8A16 GEMM: float activations times int8 weights dequantized in registers.

    y[m, n] = sum_k x[m, k] * (w_q[n, k] * s[n, k // g]) + bias[n], fp32 accumulation, in x.dtype

    x fp16/bf16/fp32 [M, K] row-major; w_q int8 [N, K] row-major; w_scale float32 [N] (group_size
    g = 0, per channel) or [N, K // g] (per group, g divides K); bias [N] any float dtype or None.

The int8 weights are converted to x's dtype in registers (integers up to 127 are exact in fp16 and
bf16) and fed to the tensor cores; fp32 inputs use an exact fp32 dot (no tf32). Under the
interpreter bf16 operands are widened to fp32 (its dot cannot multiply bf16). Scales are applied
where they cost least:
  SCALE_MODE 0  per channel: once per output, after the K loop.
  SCALE_MODE 1  per group, g a multiple of BLOCK_K: one scale per row of W per K tile; the GEMV
                applies it to the tile's partial product (weights stay exact integers in the dot),
                the GEMM to the dequantized tile (one accumulator instead of two).
  SCALE_MODE 2  per group, any other g: W tile dequantized elementwise in fp32, then rounded to
                x's dtype for the dot.

Two kernels, as for w8a8: a tiled GEMM for M > 16 (grouped ordering, autotuned per M bucket) and,
for M <= 16, a swap-AB GEMV-shaped kernel that streams W once (the wide MMA operand is the weight
tile) and splits K when N alone cannot fill the GPU; the last split to finish a tile sums the fp32
partials in split order, so results are deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._common import cast_out, i8_to

GEMV_MAX_M = 16
MAX_SPLIT_K = 8


@triton.jit
def _dequant_dot(x, w, s_ptr, rows, kk, G, NUM_GROUPS, K, acc, k0,
                 W_IS_A: tl.constexpr, SCALE_MODE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """acc += dot of x and the dequantized weight tile w (int8).

    W_IS_A: w is [BLOCK_N, BLOCK_K] and x is x^T [BLOCK_K, BLOCK_M] (GEMV, swap-AB); otherwise x is
    [BLOCK_M, BLOCK_K] and w is W^T [BLOCK_K, BLOCK_N]. rows: int64 W row of each BLOCK_N entry;
    kk: K index of each BLOCK_K entry.
    """
    x = x.to(DOT_DTYPE)
    PRECISION: tl.constexpr = "ieee" if DOT_DTYPE == tl.float32 else "tf32"
    if SCALE_MODE == 2:
        grp = kk // G
        if W_IS_A:
            s = tl.load(s_ptr + rows[:, None] * NUM_GROUPS + grp[None, :], mask=kk[None, :] < K, other=0.0)
        else:
            s = tl.load(s_ptr + rows[None, :] * NUM_GROUPS + grp[:, None], mask=kk[:, None] < K, other=0.0)
        wd = (i8_to(w, tl.float32) * s).to(DOT_DTYPE)
    elif SCALE_MODE == 1 and not W_IS_A:
        # One scale per W row for the whole tile; the partial-product alternative (below) would need
        # a second [BLOCK_M, BLOCK_N] fp32 accumulator, which spills at the large-M tile sizes.
        s = tl.load(s_ptr + rows * NUM_GROUPS + k0 // G)
        wd = (i8_to(w, tl.float32) * s[None, :]).to(DOT_DTYPE)
    else:
        wd = i8_to(w, DOT_DTYPE)
    if SCALE_MODE == 1 and W_IS_A:
        # GEMV: weights stay exact integers in the dot; the [BLOCK_N, 16] partial takes the scale.
        s = tl.load(s_ptr + rows * NUM_GROUPS + k0 // G)
        acc += tl.dot(wd, x, input_precision=PRECISION, out_dtype=tl.float32) * s[:, None]
    elif W_IS_A:
        acc = tl.dot(wd, x, acc=acc, input_precision=PRECISION, out_dtype=tl.float32)
    else:
        acc = tl.dot(x, wd, acc=acc, input_precision=PRECISION, out_dtype=tl.float32)
    return acc


@triton.jit
def _epilogue_store(acc, m_idx, n_idx, M, N, c_ptr, stride_cm, s_ptr, bias_ptr,
                    SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out[m_idx, n_idx] = acc (* per-channel scale) (+ bias), in out's dtype."""
    y = acc
    if SCALE_MODE == 0:
        y = y * tl.load(s_ptr + n_idx, mask=n_idx < N, other=0.0)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + n_idx, mask=n_idx < N, other=0.0).to(tl.float32)
    c_ptrs = c_ptr + m_idx.to(tl.int64) * stride_cm + n_idx
    tl.store(c_ptrs, cast_out(y, c_ptr.dtype.element_ty), mask=(m_idx < M) & (n_idx < N))


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _w8a16_gemm_kernel(x_ptr, w_ptr, c_ptr, s_ptr, bias_ptr, M, N, K, G, NUM_GROUPS,
                       stride_xm, stride_wn, stride_cm, M_BUCKET,
                       HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, SCALE_MODE: tl.constexpr, EVEN_K: tl.constexpr):
    pid_m, pid_n = _common.grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ram = (offs_m % M).to(tl.int64)
    rbn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x, w = _common.dot_operands(x_ptr, w_ptr, ram, rbn, stride_xm, stride_wn, kk, K, EVEN_K)
        acc = _dequant_dot(x, w, s_ptr, rbn, kk, G, NUM_GROUPS, K, acc, k0, False, SCALE_MODE, DOT_DTYPE)
    _epilogue_store(acc, offs_m[:, None], offs_n[None, :], M, N, c_ptr, stride_cm, s_ptr, bias_ptr,
                    SCALE_MODE, HAS_BIAS)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _w8a16_gemv_kernel(x_ptr, w_ptr, c_ptr, s_ptr, bias_ptr, part_ptr, cnt_ptr, M, N, K, G, NUM_GROUPS,
                       stride_xm, stride_wn, stride_cm, M_BUCKET,
                       HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr, SCALE_MODE: tl.constexpr, EVEN_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    rbn = (offs_n % N).to(tl.int64)
    ram = offs_m % M
    offs_k = tl.arange(0, BLOCK_K)
    k_start, k_stop = _common.split_k_range(pid_k, K, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        kk = k0 + offs_k
        w, x = _common.dot_operands(w_ptr, x_ptr, rbn, ram, stride_wn, stride_xm, kk, K, EVEN_K)
        acc = _dequant_dot(x, w, s_ptr, rbn, kk, G, NUM_GROUPS, K, acc, k0, True, SCALE_MODE, DOT_DTYPE)
    m_idx = offs_m[None, :]
    n_idx = offs_n[:, None]
    if SPLIT_K == 1:
        _epilogue_store(acc, m_idx, n_idx, M, N, c_ptr, stride_cm, s_ptr, bias_ptr, SCALE_MODE, HAS_BIAS)
    else:
        # part: fp32 [SPLIT_K, BLOCK_M, N]
        if _common.split_k_arrive(acc, part_ptr, cnt_ptr, pid_k, pid_n, m_idx, n_idx, N, BLOCK_M, SPLIT_K):
            total = _common.split_k_sum(part_ptr, cnt_ptr, pid_n, m_idx, n_idx, N, BLOCK_M, BLOCK_N, SPLIT_K)
            _epilogue_store(total, m_idx, n_idx, M, N, c_ptr, stride_cm, s_ptr, bias_ptr, SCALE_MODE, HAS_BIAS)


def _scale_mode(a) -> int:
    if a["G"] == 0:
        return 0
    return 1 if a["G"] % a["BLOCK_K"] == 0 else 2


_HEUR = {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0, "SCALE_MODE": _scale_mode}
_gemm = triton.heuristics(_HEUR)(_w8a16_gemm_kernel)
_gemv = triton.heuristics(_HEUR)(_w8a16_gemv_kernel)


def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# fp16/bf16 tiles: (BLOCK_M * BLOCK_K * 2 + BLOCK_N * BLOCK_K) bytes of shared memory per stage.
GEMM_CONFIGS = {
    64: [_cfg(32, 64, 128, 4, 4), _cfg(64, 64, 128, 4, 4), _cfg(64, 128, 64, 4, 4), _cfg(32, 128, 128, 4, 4)],
    256: [_cfg(64, 128, 64, 4, 4), _cfg(128, 128, 64, 8, 3), _cfg(64, 256, 64, 8, 3), _cfg(128, 64, 64, 4, 4)],
    1 << 62: [_cfg(128, 128, 64, 8, 3), _cfg(128, 256, 64, 8, 3), _cfg(256, 128, 64, 8, 3), _cfg(128, 128, 64, 4, 4)],
}
GEMM_DEFAULT = {64: _cfg(64, 64, 128, 4, 4), 256: _cfg(128, 128, 64, 8, 3), 1 << 62: _cfg(128, 256, 64, 8, 3)}


def _gemv_cfg(bn, bk, split, warps, stages):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, num_warps=warps, num_stages=stages)


# Memory-bound at M <= 16: deep pipelines (stages) and 8-32 KB weight tiles keep enough bytes in
# flight per SM to reach HBM bandwidth. The 2-warp tiles convert each weight once: with 4 warps the
# 16-wide activation side of the MMA is split between warp pairs that both convert the same weight
# tile (SASS, sm_90: 218 vs 128 warp-instructions per KB of weights at 32 x 256; the conversion is
# most of the loop), the same bytes in flight per SM (shared memory bounds it, not warps).
GEMV_CONFIGS = [_gemv_cfg(bn, bk, s, w, st) for (bn, bk, w, st) in ((16, 512, 4, 4), (32, 256, 4, 4), (64, 256, 4, 3),
                                                                     (128, 128, 8, 3), (16, 512, 2, 4), (32, 256, 2, 4))
                for s in (1, 2, 4, 8)]
GEMV_DEFAULT = triton.Config(dict(BLOCK_N=32, BLOCK_K=256), num_warps=4, num_stages=4)  # SPLIT_K by heuristic


def fit_config(cfg: triton.Config, g: int, fp32: bool) -> triton.Config:
    """cfg adjusted to the group size and dtype.

    A power-of-two group smaller than BLOCK_K gets BLOCK_K = g, so one scale covers each tile
    (SCALE_MODE 1) instead of a gathered [BLOCK_K, BLOCK_N] scale tile. Other groups (mode 2)
    stage that fp32 scale tile in shared memory too: at most 64-wide K tiles, two stages.
    fp32 inputs run an FMA dot whose register use grows with the tile: at most 64 x 64 x 32."""
    kw = dict(cfg.kwargs)
    stages = cfg.num_stages
    if g and g % kw["BLOCK_K"]:
        if g >= 16 and g & (g - 1) == 0:
            kw["BLOCK_K"] = g
        else:
            kw["BLOCK_K"] = min(kw["BLOCK_K"], 64)
            stages = min(stages, 2)
    if fp32:
        kw["BLOCK_K"] = min(kw["BLOCK_K"], 32)
        kw["BLOCK_N"] = min(kw["BLOCK_N"], 64)
        if "BLOCK_M" in kw:
            kw["BLOCK_M"] = min(kw["BLOCK_M"], 64)
    return triton.Config(kw, num_warps=cfg.num_warps, num_stages=stages)


def _fit_all(configs, named_args):
    g, fp32 = named_args["G"], named_args["x_ptr"].dtype == torch.float32
    out, seen = [], set()
    for c in configs:
        c = fit_config(c, g, fp32)
        key = (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def prune_gemm_configs(configs, named_args, **kwargs):
    return _fit_all(configs, named_args)


def prune_gemv_configs(configs, named_args, **kwargs):
    """Split-K configs only where they can help (_common.keep_split), then fit_config."""
    n, k = named_args["N"], named_args["K"]
    sms = _common.num_sms(named_args["w_ptr"].device)
    keep = [c for c in configs if _common.keep_split(_common.cdiv(n, c.kwargs["BLOCK_N"]), c.kwargs["SPLIT_K"], k,
                                                     c.kwargs["BLOCK_K"], sms)]
    return _fit_all(keep, named_args)


INTERPRET = {"gemm": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2), "gemv": dict(BLOCK_N=16, BLOCK_K=32)}


def _size_class(m: int) -> int:
    return next(c for c in GEMM_CONFIGS if m <= c)


_TUNE = dict(do_bench=_common.bench_fn)
_gemm_tuned = {c: triton.autotune(cfgs, key=["M_BUCKET", "N", "K", "G"],
                                  prune_configs_by={"early_config_prune": prune_gemm_configs}, **_TUNE)(_gemm)
               for c, cfgs in GEMM_CONFIGS.items()}
_gemv_tuned = triton.autotune(GEMV_CONFIGS, key=["M_BUCKET", "N", "K", "G"],
                              prune_configs_by={"early_config_prune": prune_gemv_configs}, **_TUNE)(_gemv)


def default_gemv_split(n: int, k: int, block_n: int, block_k: int, sms: int) -> int:
    """Splits (untuned launches) that bring cdiv(N, BLOCK_N) tiles up to about one wave."""
    tiles = _common.cdiv(n, block_n)
    s = 1
    while s < MAX_SPLIT_K and tiles * s * 2 <= sms and k >= 2 * s * block_k:
        s *= 2
    return s


@_common.on_input_device
def w8a16_gemm(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
               group_size: int = 0) -> torch.Tensor:
    """y [M, N] = x [M, K] @ (w_q [N, K] * w_scale)^T + bias, in x.dtype (validated, contiguous inputs).

    w_scale float32 [N] for group_size 0, else [N, K // group_size].
    """
    m, k = x.shape
    n = w_q.shape[0]
    out = _common.alloc((m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return out
    g = int(group_size)
    # The interpreter multiplies bf16 dot operands as their raw uint16 bits: it gets fp32 operands.
    dot_dtype = torch.float32 if (x.dtype == torch.bfloat16 and _common.interpreting()) else x.dtype
    flags = dict(HAS_BIAS=bias is not None, DOT_DTYPE=_common.tl_dtype(dot_dtype))
    bias_arg = bias if bias is not None else w_scale
    head = (x, w_q, out, w_scale, bias_arg)
    shape = (m, n, k, g, (k // g) if g else 1, x.stride(0), w_q.stride(0), out.stride(0), _common.m_bucket(m))
    tune = _common.autotuning(x)
    if m <= GEMV_MAX_M:
        skey = _common.stream_key(x.device)  # one stream lookup for both buffers
        counters = _common.tile_counters(x.device, _common.cdiv(n, 16), skey)
        part = _common.scratch(x.device, MAX_SPLIT_K * GEMV_MAX_M * n, torch.float32, "gemv", skey)
        args = head + (part, counters) + shape
        if tune:
            grid = lambda meta: (_common.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
            _gemv_tuned[grid](*args, BLOCK_M=GEMV_MAX_M, **flags)
        else:
            if _common.interpreting():
                meta, stages = dict(INTERPRET["gemv"]), 1
            else:
                cfg = fit_config(GEMV_DEFAULT, g, x.dtype == torch.float32)
                meta, stages = dict(cfg.kwargs), cfg.num_stages
            meta.setdefault("SPLIT_K", default_gemv_split(n, k, meta["BLOCK_N"], meta["BLOCK_K"],
                                                          _common.num_sms(x.device)))
            assert meta["SPLIT_K"] <= MAX_SPLIT_K, meta
            grid = (_common.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
            _gemv[grid](*args, BLOCK_M=GEMV_MAX_M, num_warps=GEMV_DEFAULT.num_warps, num_stages=stages, **flags, **meta)
        return out
    args = head + shape
    if tune:
        grid = lambda meta: (_common.cdiv(m, meta["BLOCK_M"]) * _common.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _gemm_tuned[_size_class(m)][grid](*args, **flags)
    else:
        if _common.interpreting():
            meta, warps, stages = INTERPRET["gemm"], 4, 1
        else:
            cfg = fit_config(GEMM_DEFAULT[_size_class(m)], g, x.dtype == torch.float32)
            meta, warps, stages = cfg.kwargs, cfg.num_warps, cfg.num_stages
        grid = (_common.cdiv(m, meta["BLOCK_M"]) * _common.cdiv(n, meta["BLOCK_N"]),)
        _gemm[grid](*args, num_warps=warps, num_stages=stages, **flags, **meta)
    return out
