"""Loud input checks shared by every backend: each names the tensor and prints what it got.

The C++ and CUDA host glue repeat the checks that guard memory safety; these run first, once, in
Python, so that every backend refuses bad input with the same message.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch

from .reference import MAX_K_INT32

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def tensor(op: str, name: str, t, *, dtypes: Sequence[torch.dtype], dim: Optional[int] = None,
           contiguous: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"ptqrt.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"ptqrt.{op}: {name} must have dtype {allowed}; got {_desc(t)}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"ptqrt.{op}: {name} must be {dim}-D; got {_desc(t)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"ptqrt.{op}: {name} must be contiguous (call .contiguous()); got {_desc(t)}, "
                         f"strides {t.stride()}")


def same_device(op: str, **tensors) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    dev = named[0][1].device
    for n, t in named[1:]:
        if t.device != dev:
            raise ValueError(f"ptqrt.{op}: {n} is on {t.device} but {named[0][0]} is on {dev}")


def shape(op: str, name: str, t: torch.Tensor, expected: tuple, why: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        extra = f" ({why})" if why else ""
        raise ValueError(f"ptqrt.{op}: {name} must have shape {tuple(expected)}{extra}; got {_desc(t)}")


def k_bound(op: str, k: int) -> None:
    if k > MAX_K_INT32:
        raise ValueError(f"ptqrt.{op}: K={k} exceeds {MAX_K_INT32}, the largest K whose int32 sum of "
                         f"int8 products cannot overflow (128*128*K < 2**31, -128 included); split K into chunks of at "
                         f"most {MAX_K_INT32} and add the float results")


def quantize_per_token(x, smooth) -> None:
    op = "quantize_per_token"
    tensor(op, "x", x, dtypes=FLOATS, dim=2)
    if smooth is not None:
        tensor(op, "smooth", smooth, dtypes=FLOATS, dim=1)
        shape(op, "smooth", smooth, (x.shape[1],), "one factor per input channel K")
        same_device(op, x=x, smooth=smooth)


def quantize_per_tensor(x, scale, smooth) -> None:
    op = "quantize_per_tensor"
    tensor(op, "x", x, dtypes=FLOATS, dim=2)
    tensor(op, "scale", scale, dtypes=(torch.float32,))
    if scale.numel() != 1:
        raise ValueError(f"ptqrt.{op}: scale must hold exactly one value (a static per-tensor scale); "
                         f"got {_desc(scale)}")
    if smooth is not None:
        tensor(op, "smooth", smooth, dtypes=FLOATS, dim=1)
        shape(op, "smooth", smooth, (x.shape[1],), "one factor per input channel K")
    same_device(op, x=x, scale=scale, smooth=smooth)


def w8a8_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype) -> None:
    op = "w8a8_gemm"
    tensor(op, "x_q", x_q, dtypes=(torch.int8,), dim=2)
    tensor(op, "w_q", w_q, dtypes=(torch.int8,), dim=2)
    m, k = x_q.shape
    n = w_q.shape[0]
    if w_q.shape[1] != k:
        raise ValueError(f"ptqrt.{op}: x_q is [M, K] = {tuple(x_q.shape)} but w_q is [N, K] = "
                         f"{tuple(w_q.shape)}: K differs")
    k_bound(op, k)
    tensor(op, "x_scale", x_scale, dtypes=(torch.float32,), dim=1)
    if x_scale.shape[0] not in (m, 1):
        raise ValueError(f"ptqrt.{op}: x_scale must be [M]={m} (per token) or [1] (per tensor); got {_desc(x_scale)}")
    tensor(op, "w_scale", w_scale, dtypes=(torch.float32,), dim=1)
    shape(op, "w_scale", w_scale, (n,), "one scale per output channel N")
    if bias is not None:
        tensor(op, "bias", bias, dtypes=FLOATS, dim=1)
        shape(op, "bias", bias, (n,))
    if out_dtype not in FLOATS + (torch.int32,):
        raise TypeError(f"ptqrt.{op}: out_dtype must be float16, bfloat16, float32 or int32 (raw "
                        f"accumulator); got {out_dtype}")
    if out_dtype == torch.int32 and bias is not None:
        raise ValueError(f"ptqrt.{op}: out_dtype=int32 returns the raw accumulator; bias must be None")
    same_device(op, x_q=x_q, x_scale=x_scale, w_q=w_q, w_scale=w_scale, bias=bias)


def w8a16_gemm(x, w_q, w_scale, bias, group_size) -> None:
    op = "w8a16_gemm"
    tensor(op, "x", x, dtypes=FLOATS, dim=2)
    tensor(op, "w_q", w_q, dtypes=(torch.int8,), dim=2)
    k = x.shape[1]
    n = w_q.shape[0]
    if w_q.shape[1] != k:
        raise ValueError(f"ptqrt.{op}: x is [M, K] = {tuple(x.shape)} but w_q is [N, K] = "
                         f"{tuple(w_q.shape)}: K differs")
    tensor(op, "w_scale", w_scale, dtypes=(torch.float32,))
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 0:
        raise ValueError(f"ptqrt.{op}: group_size must be an int: 0 (per channel) or a positive divisor of K; "
                         f"got {group_size!r}")
    if group_size == 0:
        shape(op, "w_scale", w_scale, (n,), "per-channel scales, group_size=0")
    else:
        if k % group_size:
            raise ValueError(f"ptqrt.{op}: group_size={group_size} does not divide K={k}")
        shape(op, "w_scale", w_scale, (n, k // group_size), f"per-group scales, group_size={group_size}")
    if bias is not None:
        tensor(op, "bias", bias, dtypes=FLOATS, dim=1)
        shape(op, "bias", bias, (n,))
    same_device(op, x=x, w_q=w_q, w_scale=w_scale, bias=bias)


def _kv_scale(op, name, scale, cache) -> None:
    nb, bs, h, d = cache.shape
    tensor(op, name, scale, dtypes=(torch.float32,))
    if tuple(scale.shape) not in ((nb, bs, h), (h, d)):
        raise ValueError(f"ptqrt.{op}: {name} must be [num_blocks, block_size, Hkv] = {(nb, bs, h)} "
                         f"(dynamic per token-head) or [Hkv, D] = {(h, d)} (static per channel); got {_desc(scale)}")


def _kv_caches(op, k_cache, v_cache) -> None:
    tensor(op, "k_cache", k_cache, dtypes=(torch.int8,), dim=4)
    tensor(op, "v_cache", v_cache, dtypes=(torch.int8,), dim=4)
    shape(op, "v_cache", v_cache, tuple(k_cache.shape), "same layout as k_cache")
    if min(k_cache.shape[1:]) < 1:
        raise ValueError(f"ptqrt.{op}: k_cache [num_blocks, block_size, Hkv, D] = {tuple(k_cache.shape)} needs "
                         f"block_size, Hkv and D of at least 1")


def kv_cache_append(k, v, k_cache, v_cache, k_scale, v_scale, slots) -> None:
    op = "kv_cache_append"
    _kv_caches(op, k_cache, v_cache)
    nb, bs, h, d = k_cache.shape
    tensor(op, "k", k, dtypes=FLOATS, dim=3)
    t = k.shape[0]
    shape(op, "k", k, (t, h, d), "[T, Hkv, D] matching the cache")
    tensor(op, "v", v, dtypes=FLOATS, dim=3)
    shape(op, "v", v, (t, h, d), "[T, Hkv, D] matching the cache")
    _kv_scale(op, "k_scale", k_scale, k_cache)
    _kv_scale(op, "v_scale", v_scale, v_cache)
    tensor(op, "slots", slots, dtypes=(torch.int64, torch.int32), dim=1)
    shape(op, "slots", slots, (t,), "one slot per new token")
    same_device(op, k=k, v=v, k_cache=k_cache, v_cache=v_cache, k_scale=k_scale, v_scale=v_scale, slots=slots)


def int8_kv_decode_attention(q, k_cache, v_cache, k_scale, v_scale, block_table, seq_lens, sm_scale) -> None:
    op = "int8_kv_decode_attention"
    tensor(op, "q", q, dtypes=FLOATS, dim=3)
    _kv_caches(op, k_cache, v_cache)
    b, hq, d = q.shape
    nb, bs, hkv, dk = k_cache.shape
    if dk != d:
        raise ValueError(f"ptqrt.{op}: head dim of q is {d} but the cache holds {dk}")
    if hq % hkv:
        raise ValueError(f"ptqrt.{op}: query heads {hq} must be a multiple of kv heads {hkv} (GQA)")
    _kv_scale(op, "k_scale", k_scale, k_cache)
    _kv_scale(op, "v_scale", v_scale, v_cache)
    tensor(op, "block_table", block_table, dtypes=(torch.int32,), dim=2)
    if block_table.shape[0] != b:
        raise ValueError(f"ptqrt.{op}: block_table must have B={b} rows; got {_desc(block_table)}")
    tensor(op, "seq_lens", seq_lens, dtypes=(torch.int32,), dim=1)
    shape(op, "seq_lens", seq_lens, (b,))
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real) or not 0 < sm_scale < math.inf:
        raise ValueError(f"ptqrt.{op}: sm_scale must be a positive finite number; got {sm_scale!r}")
    same_device(op, q=q, k_cache=k_cache, v_cache=v_cache, k_scale=k_scale, v_scale=v_scale,
                block_table=block_table, seq_lens=seq_lens)


def description(d, kind: str, fields: tuple, who: str) -> None:
    """A packed-format module entry `d` (what `who`.describe() wrote) is of `kind` and has `fields`."""
    if not isinstance(d, dict) or d.get("kind") != kind:
        got = d.get("kind") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{who}.from_description: kind must be {kind!r}; got {got!r}")
    missing = [k for k in fields if k not in d]
    if missing:
        raise ValueError(f"{who}.from_description: missing fields {missing} in {d}")
