"""The public ops (namespace ``ptqrt``): torch.library schemas, fake impls and the backend chooser.

Each op is one ``torch.library.custom_op`` whose single implementation checks its inputs (``_checks``)
and then calls the backend the chooser picks for (op, device, M). Backends:

  reference  ``ptqrt.reference`` — pure PyTorch, any device, the oracle.
  cpu        the C++ extension (``csrc/cpu``), ops ``torch.ops.ptqrt_cpu.<op>`` on the CPU key.
  triton     ``ptqrt.kernels`` — CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
  cuda       the CUDA extension (``csrc/cuda``), ops ``torch.ops.ptqrt_cuda.<op>`` on the CUDA key.

The compiled backends register under their own namespaces (not the CPU/CUDA keys of ``ptqrt``
itself) so that ``set_backend`` can choose between them at run time; see DESIGN.md, Backends.
"""
from __future__ import annotations

import bisect
import os
import threading
import warnings
from typing import Callable, Optional

import torch
from torch._library.custom_ops import CustomOpDef  # the class of torch.library.custom_op objects

from . import _checks
from . import reference as ref

BACKENDS = ("reference", "cpu", "triton", "cuda")
OP_NAMES = ("quantize_per_token", "quantize_per_tensor", "w8a8_gemm", "w8a16_gemm",
            "kv_cache_append", "int8_kv_decode_attention")
# M-buckets of the dispatch table: the smallest bucket >= M. M <= 16 is the decode (GEMV) regime.
M_BUCKETS = (1, 16, 64, 256, 1024, 4096, 1 << 62)

_lock = threading.Lock()
_cache: dict = {}
_warned: set = set()
_tables: dict = {}  # {cuda device index (None: current): dispatch table}


def _backend_from_env() -> tuple[Optional[str], str]:
    """(backend, "") from PTQRT_BACKEND (unset or empty: "auto"), or (None, why) for a value that names
    no backend: importing ptqrt must not fail on it, the first get_backend() or op call raises `why`."""
    text = os.environ.get("PTQRT_BACKEND", "")
    name = text.strip().lower() or "auto"
    if name in ("auto",) + BACKENDS:
        return name, ""
    return None, (f"PTQRT_BACKEND must be one of {', '.join(('auto',) + BACKENDS)} (or unset); got {text!r}. "
                  f"Fix or unset it, or call ptqrt.set_backend(...)")


_backend, _backend_error = _backend_from_env()


# ----------------------------------------------------------------------------- backend providers
def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _provider(backend: str, device: torch.device) -> Optional[dict]:
    """{op_name: callable} that `backend` offers on `device`, or None when it cannot run there."""
    return _load(backend, device)[0]


def _load(backend: str, device: torch.device) -> tuple[Optional[dict], str]:
    """(`_provider`'s answer, "") or (None, why `backend` cannot run on `device`, for the fallback warning)."""
    if backend == "reference":
        return {name: getattr(ref, name) for name in OP_NAMES}, ""
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return None, f"it runs on {backend.upper()} tensors only"
        from . import _build
        if _build.load(backend) is None:
            return None, (f"its {backend} extension is unavailable (it failed to build or load; "
                          f"`ptqrt build --{backend}` shows why)")
        ns = getattr(torch.ops, f"ptqrt_{backend}")
        return {name: getattr(ns, name) for name in OP_NAMES if hasattr(ns, name)}, ""
    if backend == "triton":
        if device.type == "cpu" and not _triton_interpret():
            return None, "it runs on CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return None, "it runs on CUDA tensors (and CPU ones under TRITON_INTERPRET=1) only"
        try:
            from . import kernels
        except ImportError as e:  # triton missing or broken: fall back, said once
            _warn_once(("triton-import",), f"ptqrt: the triton backend is unavailable ({e})")
            return None, f"triton failed to import ({e})"
        return dict(getattr(kernels, "OPS", {})), ""
    raise ValueError(f"unknown backend {backend!r}")


def _warn_once(key, msg: str, stacklevel: int = 4) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)


def _dispatch_table(index: Optional[int] = None) -> dict:
    """The tuned table for the GPU of this index (None: the current one), written by `ptqrt tune`, or the
    shipped one for its name, or the shipped default: one table a GPU, so that a machine with two kinds
    of GPU runs each on its own."""
    table = _tables.get(index)
    if table is None:
        from .dispatch_table import load_table
        table = _tables[index] = load_table(device=index)
    return table


def _auto_chain(op: str, device: torch.device, m: int) -> list[str]:
    if device.type == "cpu":
        return ["cpu", "reference"]  # triton runs on CPU tensors only when forced (interpreter, tests)
    if device.type == "cuda":
        first = _dispatch_table(device.index).get(op, {}).get(str(bucket(m)))
        if first == "reference":  # (tune writes it where no compiled backend could be timed)
            return ["reference"]
        return ["cuda", "triton", "reference"] if first == "cuda" else ["triton", "cuda", "reference"]
    return ["reference"]


def bucket(m: int) -> int:
    return M_BUCKETS[min(bisect.bisect_left(M_BUCKETS, m), len(M_BUCKETS) - 1)]


def resolve(op: str, device: torch.device, m: int = 1) -> tuple[str, Callable]:
    """(backend name, callable) that runs `op` for this device and M under the current setting."""
    key = (op, device.type, device.index, bucket(m), _backend)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    with _lock:
        forced = get_backend()
        chain = _auto_chain(op, device, m)
        if forced != "auto":
            chain = [forced] + [b for b in chain if b != forced]
        why = ""
        for i, name in enumerate(chain):
            impls, reason = _load(name, device)
            if i == 0:
                why = reason
            if impls and op in impls:
                if i > 0 and forced != "auto":
                    _warn_fallback(forced, op, device, why, name)
                _cache[key] = (name, impls[op])
                return _cache[key]
    raise RuntimeError(f"ptqrt: no backend can run {op} on {device}")  # unreachable: reference runs anywhere


def _warn_fallback(forced: str, op: str, device: torch.device, why: str, used: str) -> None:
    """The one warning for a forced backend that does not run `op`: once per (backend, device type)
    when the backend cannot run there at all (`why`), once per op when it runs there but lacks `op`."""
    if why:
        _warn_once((forced, device.type),
                   f"ptqrt: backend {forced!r} cannot run ops on {device.type} tensors: {why}; they fall back "
                   f"to the next backend that can ({used!r} for {op})", stacklevel=5)
    else:
        _warn_once((forced, device.type, op),
                   f"ptqrt: backend {forced!r} has no {op} for {device.type} tensors; using {used!r} instead",
                   stacklevel=5)


def set_backend(name: str) -> None:
    """Force one backend for every op ("reference", "cpu", "triton", "cuda"), or "auto" (per op,
    device and M from the dispatch table). A backend that cannot run on a device, or lacks an op, falls
    back to the next one, with one warning. The environment variable PTQRT_BACKEND sets the initial
    value (case-insensitive); one that names no backend does not stop `import ptqrt`, but the first
    `get_backend()` or op call then raises ValueError naming it, until set_backend is called."""
    global _backend, _backend_error
    name = str(name).strip().lower()
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"set_backend: backend must be one of {', '.join(('auto',) + BACKENDS)}; got {name!r}")
    with _lock:
        _backend, _backend_error = name, ""
        _cache.clear()


def get_backend() -> str:
    """The backend set by set_backend or PTQRT_BACKEND ("auto" by default). Raises ValueError naming
    PTQRT_BACKEND when its value names no backend and set_backend has not been called since."""
    if _backend is None:
        raise ValueError(_backend_error)
    return _backend


def reset_dispatch_table() -> None:
    """Forget the loaded dispatch tables (after `ptqrt tune` wrote a new one)."""
    with _lock:
        _tables.clear()
        _cache.clear()


# ----------------------------------------------------------------------------- the ops
Tensor = torch.Tensor


@torch.library.custom_op("ptqrt::quantize_per_token", mutates_args=())
def quantize_per_token(x: Tensor, smooth: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Dynamic per-token int8: x [M, K] float (divided by smooth [K] if given) ->
    (x_q int8 [M, K], x_scale float32 [M]), x_scale = absmax(row) / 127 (1 for an all-zero row)."""
    _checks.quantize_per_token(x, smooth)
    return resolve("quantize_per_token", x.device, x.shape[0])[1](x, smooth)


@quantize_per_token.register_fake
def _(x, smooth=None):
    _checks.quantize_per_token(x, smooth)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("ptqrt::quantize_per_tensor", mutates_args=())
def quantize_per_tensor(x: Tensor, scale: Tensor, smooth: Optional[Tensor] = None) -> Tensor:
    """Static per-tensor int8: x [M, K] float, scale one float32 value (calibrated) -> x_q int8 [M, K]."""
    _checks.quantize_per_tensor(x, scale, smooth)
    return resolve("quantize_per_tensor", x.device, x.shape[0])[1](x, scale, smooth)


@quantize_per_tensor.register_fake
def _(x, scale, smooth=None):
    _checks.quantize_per_tensor(x, scale, smooth)
    return x.new_empty(x.shape, dtype=torch.int8)


@torch.library.custom_op("ptqrt::w8a8_gemm", mutates_args=())
def w8a8_gemm(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
              out_dtype: torch.dtype = torch.float32) -> Tensor:
    """y [M, N] = (x_q [M, K] @ w_q [N, K]^T, exact int32) * x_scale[m] * w_scale[n] + bias[n].

    x_scale float32 [M] (per token) or [1] (per tensor); w_scale float32 [N]; bias [N] any float;
    out_dtype float16/bfloat16/float32, or int32 for the raw accumulator (no epilogue, bias None)."""
    _checks.w8a8_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    return resolve("w8a8_gemm", x_q.device, x_q.shape[0])[1](x_q, x_scale, w_q, w_scale, bias, out_dtype)


@w8a8_gemm.register_fake
def _(x_q, x_scale, w_q, w_scale, bias=None, out_dtype=torch.float32):
    _checks.w8a8_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    return x_q.new_empty((x_q.shape[0], w_q.shape[0]), dtype=out_dtype)


@torch.library.custom_op("ptqrt::w8a16_gemm", mutates_args=())
def w8a16_gemm(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None, group_size: int = 0) -> Tensor:
    """y [M, N] = x [M, K] @ (w_q [N, K] * w_scale)^T + bias, in x.dtype; dequant fused.

    w_scale float32 [N] (group_size 0, per channel) or [N, K // group_size] (per group)."""
    _checks.w8a16_gemm(x, w_q, w_scale, bias, group_size)
    return resolve("w8a16_gemm", x.device, x.shape[0])[1](x, w_q, w_scale, bias, int(group_size))


@w8a16_gemm.register_fake
def _(x, w_q, w_scale, bias=None, group_size=0):
    _checks.w8a16_gemm(x, w_q, w_scale, bias, group_size)
    return x.new_empty((x.shape[0], w_q.shape[0]))


@torch.library.custom_op("ptqrt::kv_cache_append", mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def kv_cache_append(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, k_scale: Tensor, v_scale: Tensor,
                    slots: Tensor) -> None:
    """Quantize k, v [T, Hkv, D] into the paged int8 caches [blocks, block_size, Hkv, D] at `slots` [T]
    (block * block_size + offset; negative = skip; distinct, or which token a repeated slot keeps is
    unspecified on the GPU). Scales: [blocks, block_size, Hkv] dynamic (written)
    or [Hkv, D] static per channel (read)."""
    _checks.kv_cache_append(k, v, k_cache, v_cache, k_scale, v_scale, slots)
    resolve("kv_cache_append", k.device, k.shape[0])[1](k, v, k_cache, v_cache, k_scale, v_scale, slots)


@kv_cache_append.register_fake
def _(k, v, k_cache, v_cache, k_scale, v_scale, slots):
    _checks.kv_cache_append(k, v, k_cache, v_cache, k_scale, v_scale, slots)


@torch.library.custom_op("ptqrt::int8_kv_decode_attention", mutates_args=())
def int8_kv_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_scale: Tensor, v_scale: Tensor,
                             block_table: Tensor, seq_lens: Tensor, sm_scale: float) -> Tensor:
    """out [B, Hq, D] = softmax(q·Kᵀ·sm_scale)·V over the paged int8 cache, one query per sequence.

    block_table int32 [B, max_blocks]; seq_lens int32 [B]; GQA when Hq % Hkv == 0."""
    _checks.int8_kv_decode_attention(q, k_cache, v_cache, k_scale, v_scale, block_table, seq_lens, sm_scale)
    fn = resolve("int8_kv_decode_attention", q.device, q.shape[0])[1]
    return fn(q, k_cache, v_cache, k_scale, v_scale, block_table, seq_lens, float(sm_scale))


@int8_kv_decode_attention.register_fake
def _(q, k_cache, v_cache, k_scale, v_scale, block_table, seq_lens, sm_scale):
    _checks.int8_kv_decode_attention(q, k_cache, v_cache, k_scale, v_scale, block_table, seq_lens, sm_scale)
    return torch.empty_like(q)


# ----------------------------------------------------------------------------- plain eager calls
def plain_eager_mode() -> bool:
    """Not compiling or tracing (dynamo, torch.jit.trace), and no torch-function or dispatch mode active."""
    return not (torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
                or torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack())


_fw_ad = torch.autograd.forward_ad
_functorch_level = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", lambda: None)


def _transformed() -> bool:
    """Forward-mode AD (dual tensors) or a torch.func transform (jvp, grad, vmap) is active."""
    return getattr(_fw_ad, "_current_level", -1) >= 0 or _functorch_level() is not None


def _plain_eager(args, kwargs) -> bool:
    """True for a call that the dispatcher would only pass through: `plain_eager_mode()`, no forward-mode
    AD or torch.func transform, no argument with a __torch_function__ (fx's Proxy), every tensor argument a plain tensor (no
    FakeTensor or other subclass) on a real device (meta tensors get the fake impls) and none that needs
    a gradient."""
    if not plain_eager_mode() or _transformed():
        return False
    values = (*args, *kwargs.values())
    if torch.overrides.has_torch_function(values):  # a Proxy (torch.fx), a subclass with __torch_function__
        return False
    grad = torch.is_grad_enabled()
    for a in values:
        if isinstance(a, torch.Tensor) and ((type(a) is not torch.Tensor and type(a) is not torch.nn.Parameter)
                                            or (grad and a.requires_grad) or a.is_meta):
            return False
    return True


class _EagerOp(CustomOpDef):
    """A ptqrt custom op whose plain eager calls run its body directly. Going through the dispatcher
    (autograd wrapper, redispatch, alias checks of a Python custom op) costs about 35 us of CPU a
    call, several times what a small kernel takes; compiled, traced, fake, mode and grad-requiring
    calls still go through the op, and in-place arguments get their version bumped as the op would."""

    _ptqrt_mutated: tuple = ()  # (position, name) of each argument the op writes

    def __call__(self, *args, **kwargs):
        if not _plain_eager(args, kwargs):
            return self._opoverload(*args, **kwargs)
        out = self._init_fn(*args, **kwargs)
        for pos, name in self._ptqrt_mutated:
            t = args[pos] if pos < len(args) else kwargs.get(name)
            if t is not None:
                torch.autograd.graph.increment_version(t)
        return out


for _op in (quantize_per_token, quantize_per_tensor, w8a8_gemm, w8a16_gemm, kv_cache_append, int8_kv_decode_attention):
    _op.__class__ = _EagerOp
# (position, name) of the arguments each op writes in place
MUTATED_ARGS = {"kv_cache_append": ((2, "k_cache"), (3, "v_cache"), (4, "k_scale"), (5, "v_scale"))}
kv_cache_append._ptqrt_mutated = MUTATED_ARGS["kv_cache_append"]
del _op


def remember(accepted: set, key, limit: int = 16) -> None:
    """Add `key` to a caller's set of keys of calls the public ops accepted (the callers that then
    call a backend directly: QuantLinear, the paged KV store). Emptied when full: a caller whose
    tensors change call after call (torch.func.functional_call) keeps it bounded."""
    if len(accepted) >= limit:
        accepted.clear()
    accepted.add(key)


def backend_for(op: str, device="cpu", m: int = 1) -> str:
    """The backend that would run `op` on `device` at this M now (for reports and tests)."""
    return resolve(op, torch.device(device), m)[0]


__all__ = ["BACKENDS", "OP_NAMES", "set_backend", "get_backend", "backend_for", "resolve",
           "reset_dispatch_table", *OP_NAMES]
