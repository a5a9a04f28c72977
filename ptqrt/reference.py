"""Pure-PyTorch reference for every ptqrt op: the oracle that every kernel is tested against.

Conventions (DESIGN.md): row-major, contiguous; M = tokens, N = out features, K = in features.
Quantization is symmetric and narrow-range: q = clamp(round(x / s), -127, 127) with s = absmax / 127;
an all-zero row (or channel, or group) gets s = 1, never 0 or NaN. NaN in the scaled value becomes
q = 0 (a NaN/Inf token keeps its NaN through its own scale, and touches no other row).

These functions run on any device and dtype; they favour clarity over speed. The int32 accumulation
of ``w8a8_gemm`` is done in float64, which is exact here: every partial sum is an integer below 2**31.
"""
from __future__ import annotations

from typing import Optional

import torch

QMAX = 127
# The largest K whose int32 sum of int8 products cannot overflow for any int8 inputs, -128 included
# (128 * 128 * K < 2**31). DESIGN.md's 133_143 (127 * 127 * K) holds only for the narrow range the
# quantizers produce; the ops take any int8, so every backend refuses K past this one.
MAX_K_INT32 = 131_071


def absmax_scale(amax: torch.Tensor) -> torch.Tensor:
    """s = amax / 127 in float32; amax == 0 gives 1 (NaN and Inf pass through)."""
    amax = amax.to(torch.float32)
    # A tensor divisor, not the Python scalar: on CUDA, torch turns division by a CPU scalar into a
    # multiply by its reciprocal, which is not the correctly rounded quotient every kernel computes.
    return torch.where(amax == 0, torch.ones_like(amax), amax / torch.full_like(amax, QMAX))


def round_clamp_int8(v: torch.Tensor) -> torch.Tensor:
    """Round half to even, NaN -> 0, clamp to [-127, 127], cast to int8."""
    v = torch.nan_to_num(v.to(torch.float32), nan=0.0, posinf=QMAX, neginf=-QMAX)
    return torch.clamp(torch.round(v), -QMAX, QMAX).to(torch.int8)


def quantize_weight(w: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN/MinMax symmetric int8 weights.

    w: [N, K] float. group_size 0 -> per output channel, scale [N]; g > 0 (g divides K) -> scale [N, K // g].
    Returns (w_q int8 [N, K], w_scale float32).
    """
    n, k = w.shape
    wf = w.detach().to(torch.float32)
    if group_size == 0:
        scale = absmax_scale(wf.abs().amax(dim=1))
        return round_clamp_int8(wf / scale[:, None]), scale
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide K={k}")
    g = wf.reshape(n, k // group_size, group_size)
    scale = absmax_scale(g.abs().amax(dim=2))
    return round_clamp_int8(g / scale[:, :, None]).reshape(n, k), scale


def dequantize_weight(w_q: torch.Tensor, w_scale: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """float32 [N, K] = w_q * w_scale (per channel [N] or per group [N, K // g])."""
    n, k = w_q.shape
    wf = w_q.to(torch.float32)
    if group_size == 0:
        return wf * w_scale.reshape(n, 1)
    g = k // group_size
    return (wf.reshape(n, g, group_size) * w_scale.reshape(n, g, 1)).reshape(n, k)  # (no -1: N may be 0)


def _smoothed(x: torch.Tensor, smooth: Optional[torch.Tensor]) -> torch.Tensor:
    xf = x.to(torch.float32)
    return xf if smooth is None else xf / smooth.to(torch.float32)


def quantize_per_token(x: torch.Tensor, smooth: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float (optionally divided by smooth [K]) -> (x_q int8 [M, K], x_scale float32 [M])."""
    xf = _smoothed(x, smooth)
    if xf.shape[0] == 0:
        return torch.empty(xf.shape, dtype=torch.int8, device=x.device), torch.empty(0, dtype=torch.float32, device=x.device)
    # amax that propagates NaN (torch.amax does): a NaN token gets a NaN scale.
    scale = absmax_scale(xf.abs().amax(dim=1)) if xf.shape[1] else torch.ones(xf.shape[0], device=x.device)
    return round_clamp_int8(xf / scale[:, None]), scale


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, smooth: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K] float, static scale (a one-element float32 tensor) -> x_q int8 [M, K]."""
    return round_clamp_int8(_smoothed(x, smooth) / scale.to(torch.float32).reshape(()))


def int32_matmul(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact int32 [M, N] = x_q [M, K] @ w_q [N, K]^T (float64 holds every partial sum exactly)."""
    return (x_q.to(torch.float64) @ w_q.to(torch.float64).T).to(torch.int32)


def w8a8_epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                  bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """y = (float(acc) * x_scale[m]) * w_scale[n] (+ bias[n]) in float32, then cast — in this order."""
    y = acc.to(torch.float32) * x_scale.to(torch.float32).reshape(-1, 1)
    y = y * w_scale.to(torch.float32).reshape(1, -1)
    if bias is not None:
        y = y + bias.to(torch.float32).reshape(1, -1)
    return y.to(out_dtype)


def w8a8_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y [M, N] = (x_q @ w_q^T in int32) * x_scale[m] * w_scale[n] + bias[n], cast to out_dtype.

    x_scale is [M] (per token) or [1] (per tensor). out_dtype=torch.int32 returns the raw int32
    accumulator (scales unused, bias must be None): the value every backend must match bit for bit.
    """
    acc = int32_matmul(x_q, w_q)
    if out_dtype == torch.int32:
        return acc
    return w8a8_epilogue(acc, x_scale, w_scale, bias, out_dtype)


def w8a16_gemm(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
               bias: Optional[torch.Tensor] = None, group_size: int = 0) -> torch.Tensor:
    """y [M, N] = x @ dequant(w_q, w_scale)^T (+ bias) computed in float32, returned in x.dtype. Per
    channel, the scale multiplies the dot product (x @ w_q^T) * w_scale, as the kernels apply it (an
    Inf scale then gives ±Inf, not the NaN of 0 * Inf)."""
    if group_size == 0:
        y = (x.to(torch.float32) @ w_q.to(torch.float32).T) * w_scale.reshape(1, -1)
    else:
        y = x.to(torch.float32) @ dequantize_weight(w_q, w_scale, group_size).T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def kv_cache_append(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    k_scale: torch.Tensor, v_scale: torch.Tensor, slots: torch.Tensor) -> None:
    """Quantize new keys/values into a paged int8 cache, in place.

    k, v: [T, Hkv, D] float. k_cache, v_cache: int8 [num_blocks, block_size, Hkv, D].
    slots: int64 [T], slot = block * block_size + offset; a negative slot is padding and is skipped; a
    slot past the cache is a ValueError. Slots should be distinct: here a repeated one keeps its last
    token, on the GPU any one of them (the kernels write tokens in parallel).
    Scales, float32, either
      dynamic per token-head: [num_blocks, block_size, Hkv], written here (absmax of the D values / 127), or
      static per channel:     [Hkv, D], calibrated, only read.
    """
    nb, bs, h, d = k_cache.shape
    keep = slots >= 0
    idx = slots[keep].to(torch.int64)
    past = (slots >= nb * bs).nonzero()
    if past.numel():
        t = int(past[0])
        raise ValueError(f"kv_cache_append: slots[{t}] = {int(slots[t])} is past the cache's {nb * bs} slots "
                         f"(num_blocks {nb} x block_size {bs})")
    kc, vc = k_cache.view(nb * bs, h, d), v_cache.view(nb * bs, h, d)
    for new, cache, scale in ((k[keep], kc, k_scale), (v[keep], vc, v_scale)):
        nf = new.to(torch.float32)
        if scale.dim() == 3:  # dynamic: one scale per (token, head)
            s = absmax_scale(nf.abs().amax(dim=2))  # [T, H]
            scale.view(nb * bs, h)[idx] = s
            cache[idx] = round_clamp_int8(nf / s[:, :, None])
        else:  # static per channel
            cache[idx] = round_clamp_int8(nf / scale.to(torch.float32)[None])


def dequantize_kv(cache: torch.Tensor, scale: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """float32 [length, Hkv, D] of one sequence, gathered through its blocks."""
    nb, bs, h, d = cache.shape
    if not 0 <= length <= block_ids.numel() * bs:
        raise ValueError(f"int8_kv_decode_attention: a sequence length of {length} is outside [0, max_blocks * "
                         f"block_size] = [0, {block_ids.numel() * bs}]")
    used = block_ids[: -(-length // bs)].to(torch.int64)
    bad = ((used < 0) | (used >= nb)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"int8_kv_decode_attention: block_table entry {i} = {int(used[i])} is not a block of the "
                         f"cache (num_blocks {nb})")
    pos = torch.arange(length, device=cache.device)
    flat = block_ids.to(torch.int64)[pos // bs] * bs + pos % bs
    vals = cache.view(nb * bs, h, d)[flat].to(torch.float32)
    if scale.dim() == 3:
        return vals * scale.view(nb * bs, h)[flat][:, :, None]
    return vals * scale.to(torch.float32)[None]


def int8_kv_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             k_scale: torch.Tensor, v_scale: torch.Tensor, block_table: torch.Tensor,
                             seq_lens: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """One decode step of attention over a paged int8 KV cache (softmax in float32).

    q: [B, Hq, D] float; block_table: int32 [B, max_blocks]; seq_lens: int32 [B]; Hq % Hkv == 0 (GQA:
    query head h reads kv head h // (Hq // Hkv)). out: [B, Hq, D] in q.dtype; a sequence of length 0
    gives zeros. A length past the table's capacity, or a block id out of range where the sequence
    reads, is a ValueError.
    """
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    out = torch.zeros(b, hq, d, dtype=torch.float32, device=q.device)
    for i in range(b):
        length = int(seq_lens[i])
        if length < 0:
            raise ValueError(f"int8_kv_decode_attention: seq_lens[{i}] = {length} is negative")
        if length == 0:
            continue
        kf = dequantize_kv(k_cache, k_scale, block_table[i], length).repeat_interleave(group, dim=1)  # [L, Hq, D]
        vf = dequantize_kv(v_cache, v_scale, block_table[i], length).repeat_interleave(group, dim=1)
        s = torch.einsum("hd,lhd->hl", q[i].to(torch.float32), kf) * sm_scale
        p = torch.softmax(s, dim=-1)
        out[i] = torch.einsum("hl,lhd->hd", p, vf)
    return out.to(q.dtype)


__all__ = [
    "QMAX", "MAX_K_INT32", "absmax_scale", "round_clamp_int8", "quantize_weight", "dequantize_weight",
    "quantize_per_token", "quantize_per_tensor", "int32_matmul", "w8a8_epilogue", "w8a8_gemm",
    "w8a16_gemm", "kv_cache_append", "dequantize_kv", "int8_kv_decode_attention",
]
