"""Pieces shared by the Triton kernels: int8 rounding, config choice, output allocation, split-K
workspace.

Every launcher allocates its outputs through ``alloc`` (tests swap it for a poisoning allocator so
that an element a kernel forgets to write shows up) and picks its launch parameters through
``autotuning``: on a GPU a ``triton.autotune`` wrapper measures a handful of configs per shape
bucket; under ``TRITON_INTERPRET=1`` (CPU tensors, CI) or with ``PTQRT_TRITON_AUTOTUNE=0`` one
fixed config runs, so that tests do not compile and time every config.
"""
from __future__ import annotations

import functools
import os
import threading

import torch
import triton
import triton.language as tl

@triton.jit
def to_int8(v):
    """The reference's round_clamp_int8 on fp32: NaN -> 0, clamp to [-127, 127], round half to even.

    NaN is cleared first: maximum/minimum drop NaN operands (maxnum semantics), which would turn it
    into -127 instead of 0. Clamping before rounding is equivalent to rounding first (127 is an
    integer); +-Inf clamp to +-127.
    Rounding: for fp32 |v| < 2**22, v + 1.5 * 2**23 (12582912) has no fraction bits left, so the add
    itself rounds v to an integer with the FPU's round-half-to-even, and the integer sits in the low
    mantissa bits: the low byte is the two's-complement code for |v| <= 127. Unlike libdevice's rint
    this runs under the interpreter too, and it replaces the F2I conversion (a slow unit) with an add.
    """
    v = tl.where(v != v, 0.0, v)
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    return (v + 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def i8_to(w, DTYPE: tl.constexpr):
    """Exact int8 -> DTYPE. For fp32 and fp16 the byte is spliced into a float's mantissa instead
    of going through I2F, which runs at 16 results per clock per SM on sm_80/sm_90 (a quarter of an
    add) and would bound the memory-bound kernels that convert every weight or cache byte:
        fp32: bits 0x4B400000 | (w + 128) = 12582912 + 128 + w      fp16: 0x6400 | (w + 128) = 1152 + w
    bf16 keeps Triton's own conversion, which already avoids I2F."""
    if DTYPE == tl.float32:
        u = w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B400080
        return u.to(tl.float32, bitcast=True) - 12583040.0
    elif DTYPE == tl.float16:
        u = w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x6480
        return u.to(tl.int16).to(tl.float16, bitcast=True) - 1152.0
    else:
        return w.to(DTYPE)


@triton.jit
def absmax_scale(amax):
    """s = amax / 127 (correctly rounded, as torch divides), 1 where amax == 0; NaN/Inf pass."""
    return tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, 127.0))


@triton.jit
def _max_propagate_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nan_max_abs(v, axis: tl.constexpr):
    """max |v| along axis, NaN if any element is NaN, as torch.amax (tl.max skips NaN)."""
    return tl.reduce(tl.abs(v), axis, _max_propagate_nan)


@triton.jit
def nan_max(a, b):
    """Elementwise max that keeps NaN."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def cast_out(y, DTYPE: tl.constexpr):
    """fp32 -> DTYPE with round-to-nearest-even. bf16 is rounded by hand: the interpreter's own
    fp32 -> bf16 cast truncates, which would make CPU runs differ from the GPU's cvt.rn.bf16.f32
    (identical for every non-signalling value). A NaN becomes the canonical 0x7FC0 first: the carry of
    the rounding add would turn NaNs whose bits are 0x7FFF8000 and above (0x7FFFFFFF, the one NaN a
    GPU's fp32 arithmetic makes) into -0.0."""
    if DTYPE == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = tl.where(y == y, bits, 0x7FC00000)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(DTYPE)



# --- tile loops shared by the w8a8 and w8a16 kernels ---------------------------------------------
@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program pid in grouped ordering: GROUP_M consecutive row tiles walk the
    column tiles together, so each column of W is read by all of them while it is in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def split_k_range(pid_k, K, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """[k_start, k_stop) of split pid_k: whole BLOCK_K tiles, the last split takes what is left."""
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    return k_start, min(K, k_start + k_per_split)


@triton.jit
def dot_operands(a_ptr, b_ptr, ra, rb, stride_a, stride_b, kk, K, EVEN_K: tl.constexpr):
    """Both operands of a dot at K indices kk, zero past K: A [rows ra, BLOCK_K] and the [BLOCK_K, rows
    rb] view of B^T, from row-major A and B with unit K stride. The GEMMs pass (x, w) and get x and
    W^T; the swap-AB GEMVs pass (w, x) and get W and x^T."""
    a_ptrs = a_ptr + ra[:, None] * stride_a + kk[None, :]
    b_ptrs = b_ptr + rb[None, :] * stride_b + kk[:, None]
    if EVEN_K:
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
    else:
        a = tl.load(a_ptrs, mask=kk[None, :] < K, other=0)
        b = tl.load(b_ptrs, mask=kk[:, None] < K, other=0)
    return a, b


@triton.jit
def split_k_arrive(acc, part_ptr, cnt_ptr, pid_k, pid_n, m_idx, n_idx, N, BLOCK_M: tl.constexpr,
                   SPLIT_K: tl.constexpr):
    """Store split pid_k's partial tile (part: [SPLIT_K, BLOCK_M, N], acc's dtype) and count it in
    on the tile's counter; True in the program that completes the tile, which then calls
    split_k_sum. Every thread's partial is written before one thread publishes the tile as done
    (release, gpu scope); the last arrival acquires, and reads the partials from L2 (.cg)."""
    p_ptrs = part_ptr + (pid_k * BLOCK_M + m_idx).to(tl.int64) * N + n_idx
    tl.store(p_ptrs, acc, mask=n_idx < N)
    tl.debug_barrier()
    done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    return done == SPLIT_K - 1


@triton.jit
def split_k_sum(part_ptr, cnt_ptr, pid_n, m_idx, n_idx, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SPLIT_K: tl.constexpr):
    """The tile's partials summed in split order (deterministic); resets the counter for the next
    launch on this stream."""
    total = tl.zeros((BLOCK_N, BLOCK_M), dtype=part_ptr.dtype.element_ty)
    for s in tl.static_range(SPLIT_K):
        q_ptrs = part_ptr + (s * BLOCK_M + m_idx).to(tl.int64) * N + n_idx
        total += tl.load(q_ptrs, mask=n_idx < N, other=0, cache_modifier=".cg")
    tl.store(cnt_ptr + pid_n, 0)
    return total

def on_input_device(launcher):
    """Run launcher on its first argument's GPU: Triton launches on the *current* device, which may
    be another one (tensors on cuda:1 while cuda:0 is current)."""
    @functools.wraps(launcher)
    def wrapper(t, *args, **kwargs):
        if t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return launcher(t, *args, **kwargs)
        return launcher(t, *args, **kwargs)
    return wrapper


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning(t: torch.Tensor) -> bool:
    """Measure configs (True) or run the fixed default (False) for a launch on t's device."""
    return t.is_cuda and not interpreting() and os.environ.get("PTQRT_TRITON_AUTOTUNE", "1") != "0"


def alloc(shape, dtype, device) -> torch.Tensor:
    """Uninitialised output; every element is written by the kernel (tests poison it instead)."""
    return torch.empty(shape, dtype=dtype, device=device)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host-side ints. triton.cdiv and triton.next_power_of_2 are jit-able functions
    whose host calls go through Triton's constexpr unwrapping: about 3 us each here, four or more per
    launch, where these take 0.1 us."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def m_bucket(m: int) -> int:
    """Power-of-two bucket of M (capped at 8192) for autotune keys: one tuning per bucket, not per M."""
    return min(next_pow2(max(m, 1)), 8192)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def num_sms(device: torch.device) -> int:
    """Multiprocessors of device; a small fixed number on the CPU (interpreter) so that split
    heuristics still split small test problems."""
    if device.type == "cuda":
        return _sm_count(_index(device))
    return 4


@functools.lru_cache(maxsize=None)
def _major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def capability_major(device: torch.device) -> int:
    """The compute capability's major number of a CUDA device (9 for sm_90); 0 off CUDA."""
    return _major(_index(device)) if device.type == "cuda" else 0


# Split-K and split-KV kernels count finished partial tiles per output tile in int32 counters; the
# program that finishes a tile last reduces the partials and sets its counter back to zero, so one
# zeroed buffer per (device, stream) serves every later launch without a memset. Buffers are never
# freed once handed out: a captured CUDA graph keeps using the one it saw.
_counters: dict = {}
_retired: list = []


_CAPTURING = "capturing"


def stream_key(device: torch.device):
    """(device, current stream) for the per-stream buffers below, or _CAPTURING inside CUDA-graph
    capture. A launcher that takes several buffers computes it once and passes it to each."""
    if device.type != "cuda":
        return (str(device), 0)
    if torch.cuda.is_current_stream_capturing():
        return _CAPTURING
    return (str(device), torch.cuda.current_stream(device).cuda_stream)


def tile_counters(device: torch.device, n: int, skey=None) -> torch.Tensor:
    """An int32 buffer of at least n zeros, reset to zero by each kernel that uses it."""
    key = stream_key(device) if skey is None else skey
    if key is _CAPTURING:
        # Inside CUDA-graph capture: a buffer of the graph's own pool, zeroed by a memset node at
        # each replay; not cached, since that pool's memory is reused once the graph is gone.
        return torch.zeros(n, dtype=torch.int32, device=device)
    buf = _counters.get(key)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _retired.append(buf)
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _counters[key] = buf
    return buf


# Split partials (fp32 / int32 per split and output element) need no zeroing: every split writes its
# own before the last one reads them. One buffer per (device, stream, thread, tag, dtype), grown on
# demand, spares each launch an allocation: launches on one stream run in order, so one caller's
# launches can share it, and the thread in the key keeps two threads that launch on one stream from
# interleaving between a split kernel and the merge kernel that reads its partials.
_scratch: dict = {}


def scratch(device: torch.device, numel: int, dtype: torch.dtype, tag: str, skey=None) -> torch.Tensor:
    """An uninitialised buffer of at least numel elements for this stream's next launch (a fresh one
    inside CUDA-graph capture, which must own its memory). skey: stream_key(device), if known."""
    skey = stream_key(device) if skey is None else skey
    if skey is _CAPTURING:
        return torch.empty(numel, dtype=dtype, device=device)
    key = (*skey, threading.get_ident(), tag, dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
        _scratch[key] = buf
    return buf


def keep_split(tiles: int, split: int, k: int, block_k: int, sms: int) -> bool:
    """Whether a split-K config is worth timing: one split always; more only while the output tiles
    alone do not fill one wave, up to four waves of programs, each split at least one K block."""
    return split == 1 or (tiles < sms and tiles * split <= 4 * sms and k >= split * block_k)


def bench_fn(fn, quantiles):
    """Autotune timing: short runs (configs differ by far more than the noise), median."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def tl_dtype(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.int32: tl.int32, torch.int8: tl.int8}[dtype]
