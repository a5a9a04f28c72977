"""Paged int8 KV cache: append (quantize new keys/values in place) and one decode step of attention.

Layouts (ptqrt.reference, DESIGN.md):
    k_cache, v_cache  int8 [num_blocks, block_size, Hkv, D]; token slot = block * block_size + offset
    scales            float32, per cache, either
                        dynamic per token-head [num_blocks, block_size, Hkv] (written by append), or
                        static per channel     [Hkv, D]                      (calibrated, read only)
    block_table       int32 [B, max_blocks];  seq_lens int32 [B]

kv_cache_append(k, v, k_cache, v_cache, k_scale, v_scale, slots)
    k, v [T, Hkv, D] float; slots int32/int64 [T]. For each t with slots[t] >= 0:
    cache[slot, h, :] = clamp(round_half_even(x[t, h, :] / s), -127, 127), NaN -> 0, with
    s = absmax(x[t, h, :]) / 127 (1 for an all-zero vector; stored) or the static s[h, :].
    One program per token writes all heads of k and v. Negative slots are skipped, and so (for
    memory safety; the reference would raise) are slots past the cache's end.

int8_kv_decode_attention(q, k_cache, v_cache, k_scale, v_scale, block_table, seq_lens, sm_scale)
    out[b, h] = softmax_l(sm_scale * q[b, h] . K[b, l, h // G]) @ V[b, :, h // G], G = Hq / Hkv,
    with K, V dequantized from the cache; fp32 online softmax; out in q.dtype; zeros when L = 0.
    Invalid tables stay memory-safe (the CPU backend and the reference refuse them): a length past
    the table's capacity is clamped to it, and a position whose block id is out of range gets no
    weight (zeros if none is left), as in the CUDA kernels.
    Flash-decoding: grid (B, Hkv, NUM_SPLITS); each program owns one kv head, the G query heads that
    share it (so every K/V byte is read once), and one contiguous slice of the sequence, so that a
    single long sequence still spreads over the whole GPU. Each slice leaves its normalized partial
    output and log-sum-exp; a second kernel merges the slices (skipped when NUM_SPLITS is 1).
    Dequant is folded in where it is cheapest: a dynamic K scale multiplies the score of its token,
    a dynamic V scale the probability of its token, a static K scale the query (once per program),
    a static V scale the output. G >= 2 uses tensor-core dots (query heads padded to 16, K/V
    converted to q's dtype, exact for int8); G == 1 uses fp32 multiply-reduce (on an H100 the dot
    path with its one query row padded to 16 ran 0.73-0.90x, and the G == 1 loop pipelined 3 deep
    through shared memory 0.64-0.93x: bench/NOTES.md).
    PIPE_L is the software-pipeline depth of the position loop (``tl.range(num_stages=PIPE_L)``):
    the launch's num_stages for the dot path, 1 (no cp.async) for G == 1, the machine code of an
    unannotated loop either way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import absmax_scale, cast_out, i8_to, nan_max, nan_max_abs, to_int8

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): the softmax runs on exp2


@triton.jit
def _append_one(src_ptr, dst_ptr, s_ptr, t, slot, ok, H, D, stride_t,
                DYNAMIC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = ok & (h[:, None] < H) & (d[None, :] < D)
    x = tl.load(src_ptr + t * stride_t + h[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    if DYNAMIC:
        s = absmax_scale(nan_max_abs(x, 1))
        tl.store(s_ptr + slot * H + h, s, mask=ok & (h < H))
        q = to_int8(tl.math.div_rn(x, s[:, None]))
    else:
        s = tl.load(s_ptr + h[:, None] * D + d[None, :], mask=mask, other=1.0)
        q = to_int8(tl.math.div_rn(x, s))
    tl.store(dst_ptr + slot * H * D + h[:, None] * D + d[None, :], q, mask=mask)


@triton.jit
def _kv_cache_append_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slots_ptr, NUM_SLOTS, H, D,
                            stride_kt, stride_vt,
                            DYNAMIC_K: tl.constexpr, DYNAMIC_V: tl.constexpr,
                            BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    ok = (slot >= 0) & (slot < NUM_SLOTS)
    _append_one(k_ptr, kc_ptr, ks_ptr, t, slot, ok, H, D, stride_kt, DYNAMIC_K, BLOCK_H, BLOCK_D)
    _append_one(v_ptr, vc_ptr, vs_ptr, t, slot, ok, H, D, stride_vt, DYNAMIC_V, BLOCK_H, BLOCK_D)


@triton.jit
def _decode_partial_kernel(q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_ptr, lens_ptr, out_ptr, o_part_ptr, lse_ptr,
                           qk_scale, HQ, HKV, D, NUM_BLOCKS, MAX_BLOCKS, stride_qb, stride_btb, NUM_SPLITS,
                           GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
                           DYNAMIC_K: tl.constexpr, DYNAMIC_V: tl.constexpr, USE_DOT: tl.constexpr,
                           DOT_DTYPE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_L: tl.constexpr, PIPE_L: tl.constexpr):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    # A length past the block table's capacity is clamped to it (as the CUDA kernels do; the CPU
    # backend and the reference refuse it), so no position reads past its row of the table.
    seq_len = tl.minimum(tl.load(lens_ptr + b), MAX_BLOCKS * BLOCK_SIZE)
    # This program's slice of the sequence: NUM_SPLITS equal runs of whole BLOCK_L tiles.
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_L) * BLOCK_L
    start = sp * chunk
    stop = min(seq_len, start + chunk)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    hq = hk * GROUP + g
    g_ok = g < GROUP
    d_ok = d < D
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + hq[:, None] * D + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if not DYNAMIC_K:
        q = q * tl.load(ks_ptr + hk * D + d, mask=d_ok, other=0.0)[None, :]
    if USE_DOT:
        q_dot = q.to(DOT_DTYPE)
    PREC: tl.constexpr = "ieee" if DOT_DTYPE == tl.float32 else "tf32"
    # p * v_scale goes to an fp16 dot: with V scales of ~1e-5 (|V| ~ 1e-3) nearly every product sat among
    # fp16's subnormals (error 17x the output's rounding). 64x lifts them out at no cost per tile, and
    # cannot overflow for V that fp16 holds (|V| <= 65504: scale <= 516, p * scale * 64 < 33,100).
    PV_SCALE: tl.constexpr = 64.0 if USE_DOT and DYNAMIC_V and DOT_DTYPE == tl.float16 else 1.0

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    offs_l = tl.arange(0, BLOCK_L)
    for l0 in tl.range(start, stop, BLOCK_L, num_stages=PIPE_L):
        pos = l0 + offs_l
        l_ok = pos < stop
        blk = tl.load(bt_ptr + b.to(tl.int64) * stride_btb + pos // BLOCK_SIZE, mask=l_ok, other=0)
        l_ok_mem = l_ok & (blk >= 0) & (blk < NUM_BLOCKS)
        row = blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE  # physical token slot
        kv_off = (row * HKV + hk) * D
        kv_mask = l_ok_mem[:, None] & d_ok[None, :]
        k = tl.load(kc_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0)
        # Issued together with K so that both tiles' latencies overlap (the G == 1 path has no
        # cp.async pipeline at PIPE_L = 1: its loads feed no dot).
        v = tl.load(vc_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0)
        if USE_DOT:
            s = tl.dot(q_dot, tl.trans(i8_to(k, DOT_DTYPE)), input_precision=PREC, out_dtype=tl.float32)
        else:
            s = tl.sum(q * i8_to(k, tl.float32), axis=1)[None, :]  # GROUP == 1: q is [1, BLOCK_D]
        if DYNAMIC_K:
            ks = tl.load(ks_ptr + row * HKV + hk, mask=l_ok_mem, other=0.0)
            s = s * (ks * qk_scale)[None, :]
        else:
            s = s * qk_scale
        # Positions past the slice, or whose block id is out of range, get no weight (as in the CUDA
        # kernels). A tile (and so far the slice) may then hold none: exponents are taken against 0
        # while the running max is still -inf, which leaves p = 0, l_i = 0 and alpha = 0.
        s = tl.where(l_ok_mem[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DYNAMIC_V:
            vsc = tl.load(vs_ptr + row * HKV + hk, mask=l_ok_mem, other=0.0)
            p = p * (vsc * PV_SCALE)[None, :]
        if USE_DOT:
            pv = tl.dot(p.to(DOT_DTYPE), i8_to(v, DOT_DTYPE), input_precision=PREC, out_dtype=tl.float32)
        else:
            pv = tl.sum(tl.sum(p, axis=0)[:, None] * i8_to(v, tl.float32), axis=0)[None, :]
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # l_i is 0 for a slice without live positions, else >= 1 (its largest score adds exp2(0)), or NaN,
    # which must reach the output as it does in the reference (a NaN slice is not an empty one).
    has = l_i != 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if PV_SCALE != 1.0:
        o = o * (1.0 / PV_SCALE)  # a power of two: exact
    if not DYNAMIC_V:
        o = o * tl.load(vs_ptr + hk * D + d, mask=d_ok, other=0.0)[None, :]
    row_q = b.to(tl.int64) * HQ + hq
    if SINGLE_SPLIT:
        tl.store(out_ptr + row_q[:, None] * D + d[None, :], cast_out(o, out_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & d_ok[None, :])
    else:
        part = row_q * NUM_SPLITS + sp
        tl.store(o_part_ptr + part[:, None] * D + d[None, :], o, mask=g_ok[:, None] & d_ok[None, :])
        lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + part, lse, mask=g_ok)


@triton.jit
def _decode_merge_kernel(o_part_ptr, lse_ptr, out_ptr, D, NUM_SPLITS, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[row] = sum_s w_s * o_s / sum_s w_s, w_s = 2^(lse_s - max lse); zeros if every slice is empty."""
    row = tl.program_id(0).to(tl.int64)  # b * Hq + h
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < NUM_SPLITS
    lse = tl.load(lse_ptr + row * NUM_SPLITS + s, mask=s_ok, other=float("-inf"))
    m = tl.reduce(lse, 0, nan_max)  # a NaN slice makes the output NaN, as one split would
    live = (lse > float("-inf")) | (lse != lse)
    w = tl.where(live, tl.math.exp2(lse - tl.where(m > float("-inf"), m, 0.0)), 0.0)
    o = tl.load(o_part_ptr + (row * NUM_SPLITS + s)[:, None] * D + d[None, :],
                mask=s_ok[:, None] & live[:, None] & (d[None, :] < D), other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + row * D + d, cast_out(out, out_ptr.dtype.element_ty), mask=d < D)


# Decode launch parameters. A split never gets fewer than SPLIT_MIN_TOKENS positions of capacity;
# splits are added until B * Hkv * splits reaches SPLIT_TARGET_WAVES waves of programs.
SPLIT_MIN_TOKENS = 256
SPLIT_TARGET_WAVES = 4
MAX_SPLITS = 64
# Launch parameters. Measured on an H100 without GQA (bench/NOTES.md, a sweep of BLOCK_L x num_warps x
# waves): two warps per 64-token tile beat four by 1.4-1.8x (more programs resident per SM, more tiles'
# loads in flight). The GQA path (tl.dot) keeps the four warps it was validated with on the GPU.
DECODE = {"BLOCK_L": 64, "num_warps": 2, "num_stages": 3}
DECODE_GQA_WARPS = 4
INTERPRET = {"BLOCK_L": 16}  # tests may add "NUM_SPLITS"


def num_splits(batch: int, hkv: int, capacity: int, sms: int) -> int:
    """Splits per (sequence, kv head): enough programs for the GPU, none shorter than the minimum."""
    splits = 1
    while (splits < MAX_SPLITS and batch * hkv * splits < SPLIT_TARGET_WAVES * sms
           and capacity >= 2 * splits * SPLIT_MIN_TOKENS):
        splits *= 2
    return splits


@_common.on_input_device
def kv_cache_append(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    k_scale: torch.Tensor, v_scale: torch.Tensor, slots: torch.Tensor) -> None:
    """Quantize k, v [T, Hkv, D] into the caches at slots [T] (negative = skip), in place."""
    t = k.shape[0]
    nb, bs, h, d = k_cache.shape
    if t == 0 or h == 0 or d == 0:
        return
    block_h, block_d = _common.next_pow2(h), _common.next_pow2(d)
    _kv_cache_append_kernel[(t,)](
        k, v, k_cache, v_cache, k_scale, v_scale, slots, nb * bs, h, d, k.stride(0), v.stride(0),
        DYNAMIC_K=k_scale.dim() == 3, DYNAMIC_V=v_scale.dim() == 3, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=max(1, min(8, block_h * block_d // 512)))


@_common.on_input_device
def int8_kv_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor,
                             v_scale: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                             sm_scale: float) -> torch.Tensor:
    """out [B, Hq, D] in q.dtype: one query per sequence over the paged int8 cache (see module doc)."""
    b, hq, d = q.shape
    nb, bs, hkv, _ = k_cache.shape
    out = _common.alloc((b, hq, d), q.dtype, q.device)
    if b == 0 or hq == 0:
        return out
    group = hq // hkv
    # GQA groups use tensor-core dots (the query heads of a group are the rows of one MMA); without
    # GQA the fp32 multiply-reduce path runs.
    use_dot = group > 1
    block_g = max(16, _common.next_pow2(group)) if use_dot else 1
    block_d = max(16, _common.next_pow2(d))
    max_blocks = block_table.shape[1]
    if _common.interpreting():
        meta = dict(INTERPRET)
        splits = meta.pop("NUM_SPLITS", None) or num_splits(b, hkv, max_blocks * bs, _common.num_sms(q.device))
        launch = dict(BLOCK_L=meta["BLOCK_L"], PIPE_L=1)  # the interpreter does not pipeline
        # The interpreter multiplies bf16 dot operands as raw bits: it gets fp32 operands.
        dot_dtype = torch.float32 if q.dtype == torch.bfloat16 else q.dtype
    else:
        splits = num_splits(b, hkv, max_blocks * bs, _common.num_sms(q.device))
        launch = dict(DECODE)
        if use_dot:
            launch["num_warps"] = DECODE_GQA_WARPS
        # Dot loops at the launch's depth (what an unannotated loop gets), the G == 1 loop at 1
        # (the same machine code as an unannotated loop in both cases).
        launch["PIPE_L"] = launch["num_stages"] if use_dot else 1
        dot_dtype = q.dtype
    if splits > 1:
        skey = _common.stream_key(q.device)
        o_part = _common.scratch(q.device, b * hq * splits * d, torch.float32, "decode_o", skey)
        lse = _common.scratch(q.device, b * hq * splits, torch.float32, "decode_lse", skey)
    else:
        o_part = lse = out  # unused
    _decode_partial_kernel[(b, hkv, splits)](
        q, k_cache, v_cache, k_scale, v_scale, block_table, seq_lens, out, o_part, lse,
        float(sm_scale) * LOG2E, hq, hkv, d, nb, max_blocks, q.stride(0), block_table.stride(0), splits,
        GROUP=group, BLOCK_SIZE=bs, SINGLE_SPLIT=splits == 1, DYNAMIC_K=k_scale.dim() == 3, DYNAMIC_V=v_scale.dim() == 3,
        USE_DOT=use_dot, DOT_DTYPE=_common.tl_dtype(dot_dtype), BLOCK_G=block_g, BLOCK_D=block_d, **launch)
    if splits > 1:
        _decode_merge_kernel[(b * hq,)](o_part, lse, out, d, splits, BLOCK_S=_common.next_pow2(splits),
                                        BLOCK_D=block_d, num_warps=1)
    return out

