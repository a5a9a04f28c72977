"""Activation quantization to int8: dynamic per token and static per tensor, smoothing fused.

    quantize_per_token(x, smooth)         x [M, K] fp16/bf16/fp32, smooth [K] or None
        v = x / smooth (fp32), s[m] = max_k |v[m, k]| / 127 (1 if the row is all zero),
        x_q[m, k] = clamp(round_half_even(v[m, k] / s[m]), -127, 127), NaN -> 0
        -> (x_q int8 [M, K], x_scale float32 [M])
    quantize_per_tensor(x, scale, smooth) scale: one float32 value (calibrated)
        x_q = clamp(round_half_even((x / smooth) / scale), -127, 127) -> int8 [M, K]

Bit-exact with ptqrt.reference: divisions are correctly rounded (``div_rn``; Triton's ``/`` is an
approximate divide on the GPU), rounding is half-to-even, and a NaN anywhere in a row makes that
row's scale NaN and its codes 0, as torch.amax propagates it.

Both kernels are memory-bound: one read of x, one write of x_q. A row up to 16384 wide is held in
registers, so x is read once; wider rows take a second pass over x (from L2 for typical sizes).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._common import absmax_scale, nan_max, nan_max_abs, to_int8

_ONE_PASS_MAX_K = 16384
_TWO_PASS_BLOCK_K = 4096


@triton.jit
def _quantize_per_token_kernel(x_ptr, smooth_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm,
                               HAS_SMOOTH: tl.constexpr, ONE_PASS: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        mask = row_ok[:, None] & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            sm = tl.load(smooth_ptr + cols, mask=cols < K, other=1.0).to(tl.float32)
            x = tl.math.div_rn(x, sm[None, :])
        scale = absmax_scale(nan_max_abs(x, 1))
        q = to_int8(tl.math.div_rn(x, scale[:, None]))
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            c = k0 + cols
            mask = row_ok[:, None] & (c[None, :] < K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                sm = tl.load(smooth_ptr + c, mask=c < K, other=1.0).to(tl.float32)
                x = tl.math.div_rn(x, sm[None, :])
            amax = nan_max(amax, nan_max_abs(x, 1))
        scale = absmax_scale(amax)
        for k0 in range(0, K, BLOCK_K):
            c = k0 + cols
            mask = row_ok[:, None] & (c[None, :] < K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                sm = tl.load(smooth_ptr + c, mask=c < K, other=1.0).to(tl.float32)
                x = tl.math.div_rn(x, sm[None, :])
            tl.store(q_ptr + rows[:, None] * stride_qm + c[None, :], to_int8(tl.math.div_rn(x, scale[:, None])),
                     mask=mask)
    tl.store(s_ptr + rows, scale, mask=row_ok)


@triton.jit
def _quantize_per_tensor_kernel(x_ptr, smooth_ptr, scale_ptr, q_ptr, M, K, stride_xm, stride_qm,
                                HAS_SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    rows = rows.to(tl.int64)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        sm = tl.load(smooth_ptr + cols, mask=cols < K, other=1.0).to(tl.float32)
        x = tl.math.div_rn(x, sm[None, :])
    # The scale stays on the device (no .item() sync, CUDA-graph safe).
    s = tl.load(scale_ptr)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], to_int8(tl.math.div_rn(x, s)), mask=mask)


def _warps(elements: int) -> int:
    # About 16 elements per thread: enough 16-byte loads in flight per thread to cover latency.
    return max(1, min(16, elements // 512))


@_common.on_input_device
def quantize_per_token(x: torch.Tensor, smooth: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] fp16/bf16/fp32 contiguous, smooth [K] or None -> (x_q int8 [M, K], x_scale float32 [M])."""
    m, k = x.shape
    x_q = _common.alloc((m, k), torch.int8, x.device)
    x_scale = _common.alloc((m,), torch.float32, x.device)
    if m == 0:
        return x_q, x_scale
    if k == 0:
        return x_q, x_scale.fill_(1.0)  # the reference's all-zero row: s = 1
    block_k = _common.next_pow2(k)
    one_pass = block_k <= _ONE_PASS_MAX_K
    if not one_pass:
        block_k = _TWO_PASS_BLOCK_K
    block_m = max(1, min(_common.next_pow2(m), 4096 // block_k))
    grid = (_common.cdiv(m, block_m),)
    _quantize_per_token_kernel[grid](
        x, smooth if smooth is not None else x, x_q, x_scale, m, k, x.stride(0), x_q.stride(0),
        HAS_SMOOTH=smooth is not None, ONE_PASS=one_pass, BLOCK_M=block_m, BLOCK_K=block_k,
        num_warps=_warps(block_m * block_k))
    return x_q, x_scale


@_common.on_input_device
def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, smooth: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K] fp16/bf16/fp32 contiguous, scale float32 with one element, smooth [K] or None -> x_q int8 [M, K]."""
    m, k = x.shape
    x_q = _common.alloc((m, k), torch.int8, x.device)
    if m == 0 or k == 0:
        return x_q
    block_k = min(_common.next_pow2(k), 1024)
    block_m = max(1, min(_common.next_pow2(m), 8192 // block_k))
    grid = (_common.cdiv(m, block_m), _common.cdiv(k, block_k))
    _quantize_per_tensor_kernel[grid](
        x, smooth if smooth is not None else x, scale, x_q, m, k, x.stride(0), x_q.stride(0),
        HAS_SMOOTH=smooth is not None, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=_warps(block_m * block_k))
    return x_q
