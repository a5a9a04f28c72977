"""The int8 KV cache, model-agnostic part: the calibrated scales of one attention layer
(KVCacheQuant, saved with the model) and the paged int8 storage of one layer (PagedInt8KV, a run-time
object, never saved). The Hugging Face glue is in ``ptqrt.integrations.hf``.

Quantization is symmetric int8, q = clamp(round(x / s), -127, 127), with either
  per_token    dynamic: one scale per (token, kv head), s = absmax over the D channels / 127,
               computed by ``kv_cache_append`` as tokens are written;
  per_channel  static: one scale per (kv head, channel), s = absmax over calibration tokens / 127
               (0 -> 1), of the keys/values as the cache stores them (after RoPE where there is one).

Paged layout (what ``kv_cache_append`` / ``int8_kv_decode_attention`` read):
  k_cache, v_cache  int8 [num_blocks, block_size, Hkv, D]
  block_table       int32 [B, n_cols]; sequence b owns blocks  j * B + b  (j = 0, 1, ...), so that
                    growing every sequence by one block column keeps the old blocks where they are,
                    and reordering sequences (beam search) is one index_select on a [cols, B, ...] view.
  seq_lens          int32 [B], tokens held per sequence. Padding tokens are never stored (negative
                    slots), so a left-padded sequence holds only its real tokens.
A store with a `capacity` (sliding-window layers) is a ring: a sequence holds its last `capacity`
tokens at most, stored token i at position (i - base) mod capacity. The held tokens always fill
positions 0..held-1 (or the whole ring), which is what the kernels read; attention does not depend on
their order, so a ring of a window's size holds exactly that window.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import _checks, ops
from ..reference import absmax_scale
from .scales import keep_float32

GRANULARITIES = ("per_token", "per_channel")


class KVCacheQuant(nn.Module):
    """How one attention layer's KV cache is quantized; attached as ``<attention module>.kv_quant``.

    Buffers (per_channel only; per_token has none):
      k_scale, v_scale  float32 [num_kv_heads, head_dim]   calibrated absmax / 127 (0 -> 1); they stay
                        float32 through the model's dtype casts (.half()) and follow its device moves
    """

    def __init__(self, granularity: str, num_kv_heads: int, head_dim: int, layer_idx: int, device=None) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"KVCacheQuant: granularity must be one of {GRANULARITIES}; got {granularity!r}")
        for name, val in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"KVCacheQuant: {name} must be a positive int; got {val!r}")
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"KVCacheQuant: layer_idx must be a non-negative int; got {layer_idx!r}")
        self.granularity, self.layer_idx = granularity, layer_idx
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        static = granularity == "per_channel"
        shape = (num_kv_heads, head_dim)
        self.register_buffer("k_scale", torch.ones(shape, dtype=torch.float32, device=device) if static else None)
        self.register_buffer("v_scale", torch.ones(shape, dtype=torch.float32, device=device) if static else None)

    @property
    def is_static(self) -> bool:
        return self.granularity == "per_channel"

    @classmethod
    def from_absmax(cls, k_absmax: torch.Tensor, v_absmax: torch.Tensor, layer_idx: int) -> "KVCacheQuant":
        """Static per-channel scales from calibrated absmax values, each [num_kv_heads, head_dim]."""
        if k_absmax.dim() != 2 or k_absmax.shape != v_absmax.shape:
            raise ValueError(f"KVCacheQuant.from_absmax: k/v absmax must both be [Hkv, D]; got "
                             f"{tuple(k_absmax.shape)} and {tuple(v_absmax.shape)}")
        h, d = k_absmax.shape
        q = cls("per_channel", int(h), int(d), layer_idx, device=k_absmax.device)
        q.k_scale.copy_(absmax_scale(k_absmax))
        q.v_scale.copy_(absmax_scale(v_absmax))
        return q

    def _apply(self, fn, recurse=True):
        return super()._apply(keep_float32(fn, self, ("k_scale", "v_scale")), recurse)

    def describe(self) -> dict:
        """What the packed format records for this module (enough to rebuild it empty)."""
        return {"kind": "kv_cache", "granularity": self.granularity, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "layer_idx": self.layer_idx}

    @classmethod
    def from_description(cls, d: dict, device=None) -> "KVCacheQuant":
        _checks.description(d, "kv_cache", ("granularity", "num_kv_heads", "head_dim", "layer_idx"), "KVCacheQuant")
        return cls(d["granularity"], d["num_kv_heads"], d["head_dim"], d["layer_idx"], device=device)

    def forward(self, *args, **kwargs):  # noqa: D401 -- holds scales; the cache reads them
        raise RuntimeError("KVCacheQuant is not called: the int8 KV cache reads its k_scale/v_scale")

    def extra_repr(self) -> str:
        return (f"granularity={self.granularity}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"layer_idx={self.layer_idx}")


def _positive_or_none(where: str, name: str, val) -> None:
    if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val <= 0):
        raise ValueError(f"{where}: {name} must be a positive int or None; got {val!r}")


class PagedInt8KV:
    """Paged int8 K/V of one attention layer for a batch of B sequences (see the module docstring).

    Storage grows on demand, doubling its block columns; when `max_tokens` is given (the longest a
    sequence is expected to get, e.g. generate's max length), a doubling that would pass it stops at
    it (in whole blocks), since doubling alone can end with nearly twice the memory the sequences
    need; a sequence that still gets longer grows by doubling again. With static scales (k_scale/v_scale
    given, float32 [Hkv, D]) only int8 values are stored; otherwise a float32 scale per (slot, kv head).
    capacity: None (every token kept) or the ring's size (each sequence holds its last `capacity`
    tokens; see the module docstring); ``set_capacity`` changes it.
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, device, block_size: int = 16,
                 k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
                 max_tokens: Optional[int] = None, capacity: Optional[int] = None) -> None:
        if block_size <= 0:
            raise ValueError(f"PagedInt8KV: block_size must be positive; got {block_size}")
        for name, val in (("max_tokens", max_tokens), ("capacity", capacity)):
            _positive_or_none("PagedInt8KV", name, val)
        self.capacity = capacity
        self.max_cols = None if max_tokens is None else -(-max_tokens // block_size)
        if (k_scale is None) != (v_scale is None):
            raise ValueError("PagedInt8KV: give both static scales or neither")
        self.batch, self.heads, self.head_dim, self.block_size = batch, num_kv_heads, head_dim, block_size
        self.device = torch.empty(0, device=device).device  # as tensors report it: "cuda" -> "cuda:0"
        self.static = k_scale is not None
        if self.static:
            for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
                if tuple(s.shape) != (num_kv_heads, head_dim):
                    raise ValueError(f"PagedInt8KV: static {name} must be [Hkv, D] = {(num_kv_heads, head_dim)}; "
                                     f"got {tuple(s.shape)}")
            # Own copies: the caller's (a KVCacheQuant's buffers) may change or need grad later.
            self.k_scale = k_scale.detach().to(self.device, torch.float32, copy=True).contiguous()
            self.v_scale = v_scale.detach().to(self.device, torch.float32, copy=True).contiguous()
        self.cols = 0
        self._accepted: set = set()  # keys of calls the public ops accepted (see _call)
        self._alloc(1)
        self._n = [0] * batch  # tokens stored per sequence, on the host: slots and growth are planned here
        self._first = [0] * batch  # the oldest token each holds (a ring forgets the ones before)
        self._base = [0] * batch  # the token at position 0 (modulo the ring)
        self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self._table: Optional[torch.Tensor] = None

    @property
    def lens(self) -> torch.Tensor:
        """Tokens stored per sequence (ever, less those dropped): a new int64 [B] host tensor each read."""
        return torch.tensor(self._n, dtype=torch.int64)

    def held(self) -> list[int]:
        """Tokens each sequence holds, its last ones: what the kernels read (``seq_lens`` on the device)."""
        return [n - f for n, f in zip(self._n, self._first)]

    def _publish(self) -> None:
        self.seq_lens = self._to_device(self.held(), torch.int32)

    # ------------------------------------------------------------------ storage
    def _alloc(self, cols: int) -> None:
        shape = (cols * self.batch, self.block_size, self.heads, self.head_dim)
        k = torch.zeros(shape, dtype=torch.int8, device=self.device)
        v = torch.zeros(shape, dtype=torch.int8, device=self.device)
        if self.cols:
            n = self.cols * self.batch
            k[:n], v[:n] = self.k_cache, self.v_cache
        if not self.static:
            ks = torch.ones(shape[:3], dtype=torch.float32, device=self.device)
            vs = torch.ones(shape[:3], dtype=torch.float32, device=self.device)
            if self.cols:
                ks[:n], vs[:n] = self.k_scale, self.v_scale
            self.k_scale, self.v_scale = ks, vs
        self.k_cache, self.v_cache, self.cols = k, v, cols

    def _ensure(self, max_len: int) -> None:
        need = max(1, -(-max_len // self.block_size))
        if need > self.cols:
            # Doubling, up to the cap while below it; past the cap (a sequence longer than expected)
            # doubling again, so that growth stays a few copies rather than one per block.
            capped = self.max_cols is not None and self.cols < self.max_cols
            grown = min(2 * self.cols, self.max_cols) if capped else 2 * self.cols
            self._alloc(max(need, grown))

    def _slots(self, b: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """Flat slot (block * block_size + offset) of stored token `tok` of sequence `b` (int64, host)."""
        pos = tok - torch.tensor(self._base, dtype=torch.int64)[b]
        if self.capacity is not None:
            pos = pos % self.capacity
        return ((pos // self.block_size) * self.batch + b) * self.block_size + pos % self.block_size

    def block_table(self) -> torch.Tensor:
        cols = max(1, -(-max(self.held(), default=0) // self.block_size))
        if self._table is None or self._table.shape[1] != cols:
            t = torch.arange(cols)[None, :] * self.batch + torch.arange(self.batch)[:, None]
            self._table = self._to_device(t, torch.int32)
        return self._table

    def _to_device(self, values, dtype: torch.dtype) -> torch.Tensor:
        """Small host values (a list, or a host tensor the caller no longer needs) as a tensor on the
        cache's device. To a GPU they go from pinned memory without waiting (on the current stream): a
        copy from pageable memory would make the host wait for the GPU's queue at every layer of every
        decode step."""
        if self.device.type == "cuda":
            host = torch.tensor(values, dtype=dtype) if isinstance(values, list) else values.to(dtype)
            return host.pin_memory().to(self.device, non_blocking=True)
        if isinstance(values, list):
            return torch.tensor(values, dtype=dtype, device=self.device)
        return values.to(self.device, dtype)

    def _call(self, op: str, key: Optional[tuple], *args):
        """ops.<op>(*args). Every tensor but the caller's k, v or q is this store's own, made on its
        device, contiguous, with the dtypes the ops require and shapes that follow from the batch size
        and the block columns; `key` names everything else the ops' checks read (the caller's tensors'
        dtypes, device and shape, the backend setting, batch size and columns). After the public op
        accepted a call with a key, plain eager calls with the same key call the backend's function
        directly (the public op's checks cost more than a small step's kernels); None (compiling,
        tracing, a mode, a subclass, a caller's tensor that needs grad) always takes the op."""
        if key is None or key not in self._accepted:
            out = getattr(ops, op)(*args)
            if key is not None:
                ops.remember(self._accepted, key)
            return out
        out = ops.resolve(op, self.device, args[0].shape[0])[1](*args)
        for pos, _ in ops.MUTATED_ARGS.get(op, ()):  # as the op does for the tensors it writes
            torch.autograd.graph.increment_version(args[pos])
        return out

    def _key(self, op: str, *tensors: torch.Tensor) -> Optional[tuple]:
        if not ops._plain_eager(tensors, {}):
            return None
        return (op, ops.get_backend(), self.batch, self.cols) + tuple((t.dtype, t.device, tuple(t.shape))
                                                                      for t in tensors)

    # ------------------------------------------------------------------ write / read
    def append(self, k: torch.Tensor, v: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
        """Quantize and store new tokens. k, v: [B, T, Hkv, D] float (any strides) on the cache's
        device; keep: host bool [B, T], False for padding tokens, which are not stored (None: keep all)."""
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise TypeError(f"PagedInt8KV.append: k and v must be tensors; got {type(k).__name__} and "
                            f"{type(v).__name__}")
        want = (self.batch, k.shape[1] if k.dim() == 4 else -1, self.heads, self.head_dim)
        if tuple(k.shape) != want or v.shape != k.shape:
            raise ValueError(f"PagedInt8KV.append: k and v must both be [B, T, Hkv, D] = [{self.batch}, T, "
                             f"{self.heads}, {self.head_dim}]; got k {tuple(k.shape)}, v {tuple(v.shape)}")
        if k.device != self.device or v.device != self.device:
            raise ValueError(f"PagedInt8KV.append: k and v must be on the cache's device {self.device}; "
                             f"got {k.device} and {v.device}")
        b, t = k.shape[:2]
        if t == 0:
            return
        bs, c = self.block_size, self.capacity
        if keep is None and t == 1:  # the decode step: plain Python ints, no small host tensors
            at = [n - z for n, z in zip(self._n, self._base)]
            if c is not None:
                at = [p % c for p in at]
            slots = [((p // bs) * b + i) * bs + p % bs for i, p in enumerate(at)]
            new = [n + 1 for n in self._n]
        else:
            lens = self.lens
            if keep is None:
                pos = lens[:, None] + torch.arange(t)[None, :]
                slots = self._slots(torch.arange(b)[:, None], pos)
                counts = torch.full((b,), t, dtype=torch.int64)
            else:
                keep = keep.to(torch.bool)
                if tuple(keep.shape) != (b, t):
                    raise ValueError(f"PagedInt8KV.append: keep must be [B, T] = [{b}, {t}]; got {tuple(keep.shape)}")
                pos = lens[:, None] + keep.to(torch.int64).cumsum(1) - 1
                slots = torch.where(keep, self._slots(torch.arange(b)[:, None], pos.clamp(min=0)), -1)
                counts = keep.sum(1)
            if c is not None:  # a token that a later one of this call overwrites in the ring is not written
                slots = torch.where(pos < (lens + counts)[:, None] - c, -1, slots)
            slots = slots.reshape(-1)
            new = (lens + counts).tolist()
        first = self._first if c is None else [max(f, n - c) for f, n in zip(self._first, new)]
        self._ensure(max((n - f for n, f in zip(new, first)), default=0))
        kf = k.reshape(b * t, self.heads, self.head_dim).contiguous()
        vf = v.reshape(b * t, self.heads, self.head_dim).contiguous()
        slots_t = self._to_device(slots, torch.int64)
        self._call("kv_cache_append", self._key("kv_cache_append", kf, vf), kf, vf, self.k_cache, self.v_cache,
                   self.k_scale, self.v_scale, slots_t)
        self._n, self._first = new, first
        self._publish()

    def decode(self, q: torch.Tensor, sm_scale: float) -> torch.Tensor:
        """One decode step: q [B, Hq, D] -> [B, Hq, D] in q.dtype, attending over every stored token."""
        q = q.contiguous()
        sm_scale = float(sm_scale)
        key = self._key("int8_kv_decode_attention", q) if sm_scale > 0 else None
        return self._call("int8_kv_decode_attention", key, q, self.k_cache, self.v_cache, self.k_scale, self.v_scale,
                          self.block_table(), self.seq_lens, sm_scale)

    def dequantize(self, valid: Optional[torch.Tensor] = None, lo: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (K, V), each [B, L - lo, Hkv, D]: positions lo..L-1. valid: host bool [B, L] saying
        which positions hold a stored token (the i-th True of row b is stored token i); other positions
        are 0. None: L = the longest sequence, every row left-aligned. Every token asked for must be
        held (a ring holds only its last `capacity`)."""
        if valid is None:
            length = max(self._n, default=0)
            valid = torch.arange(length)[None, :] < self.lens[:, None]
            pos = torch.arange(length)[None, :].expand(self.batch, length)
        else:
            pos = (valid.to(torch.int64).cumsum(1) - 1).clamp(min=0)
        valid, pos = valid[:, lo:], pos[:, lo:]
        lost = valid & (pos < torch.tensor(self._first, dtype=torch.int64)[:, None])
        if bool(lost.any()):
            b = int(lost.any(1).nonzero()[0])
            raise RuntimeError(f"PagedInt8KV.dequantize: sequence {b} holds tokens {self._first[b]}..{self._n[b] - 1} "
                               f"(a ring of {self.capacity}); token {int(pos[b][lost[b]][0])} is gone")
        slots = torch.where(valid, self._slots(torch.arange(self.batch)[:, None], pos), 0).to(self.device)
        keep = valid.to(self.device)[..., None, None]
        out = []
        for cache, scale in ((self.k_cache, self.k_scale), (self.v_cache, self.v_scale)):
            vals = cache.view(-1, self.heads, self.head_dim)[slots].to(torch.float32)
            if self.static:
                vals = vals * scale[None, None]
            else:
                vals = vals * scale.view(-1, self.heads)[slots][..., None]
            out.append(torch.where(keep, vals, torch.zeros((), device=self.device)))
        return out[0], out[1]

    # ------------------------------------------------------------------ batch edits
    def select(self, index: torch.Tensor) -> None:
        """Keep sequences `index` (int64 [B'], repeats allowed: beam search, repeat_interleave), by copy."""
        index = index.to(torch.int64)
        host, dev = index.cpu(), index.to(self.device)
        nb = len(host)

        def pick(t):
            rest = t.shape[1:]
            return t.view(self.cols, self.batch, *rest).index_select(1, dev).reshape(self.cols * nb, *rest)

        self.k_cache, self.v_cache = pick(self.k_cache), pick(self.v_cache)
        if not self.static:
            self.k_scale, self.v_scale = pick(self.k_scale), pick(self.v_scale)
        self.batch = nb
        rows = host.tolist()
        self._n, self._first, self._base = ([v[i] for i in rows] for v in (self._n, self._first, self._base))
        self._publish()
        self._table = None

    def drop_last(self, counts: torch.Tensor) -> None:
        """Forget the last counts[b] >= 0 stored tokens of each sequence (host int64 [B]). A ring keeps
        what it still holds of the tokens before (see ``first``)."""
        counts = torch.as_tensor(counts)
        if tuple(counts.shape) != (self.batch,) or bool((counts < 0).any()):
            raise ValueError(f"PagedInt8KV.drop_last: counts must be [B] = [{self.batch}] non-negative ints; "
                             f"got {counts.tolist()}")
        self._n = (self.lens - counts.to(torch.int64)).clamp(min=0).tolist()
        self._first = [min(f, n) for f, n in zip(self._first, self._n)]
        if self.capacity is not None and any(n - f < self.capacity and (f - z) % self.capacity
                                             for n, f, z in zip(self._n, self._first, self._base)):
            self._relayout(self.capacity)  # the held tokens no longer start at position 0
        self._publish()

    def keep_last(self, counts) -> None:
        """Forget all but the last counts[b] >= 0 tokens each sequence holds (host ints [B]), moving those to
        the front of its storage, so that what comes after reuses the room (a sliding layer recording its
        past states, after a crop)."""
        counts = torch.as_tensor(counts)
        if tuple(counts.shape) != (self.batch,) or bool((counts < 0).any()):
            raise ValueError(f"PagedInt8KV.keep_last: counts must be [B] = [{self.batch}] non-negative ints; "
                             f"got {counts.tolist()}")
        self._first = [max(f, n - c) for f, n, c in zip(self._first, self._n, counts.tolist())]
        self._relayout(self.capacity)
        self._publish()

    @property
    def first(self) -> list[int]:
        """The oldest token each sequence holds (0 without a ring; a ring forgets the ones before)."""
        return list(self._first)

    def set_capacity(self, capacity: Optional[int]) -> None:
        """Re-lay the held tokens in a ring of `capacity` (None: no ring). Growing keeps every held
        token; shrinking keeps each sequence's last `capacity`."""
        _positive_or_none("PagedInt8KV.set_capacity", "capacity", capacity)
        if capacity != self.capacity:
            self._relayout(capacity)
            self._publish()

    def _relayout(self, capacity: Optional[int]) -> None:
        """Move each sequence's held tokens (its last `capacity` of them) to positions 0.. of a ring of
        `capacity`: base = first."""
        keep = [n - f if capacity is None else min(n - f, capacity) for n, f in zip(self._n, self._first)]
        span = max(keep, default=0)
        n = torch.tensor(self._n, dtype=torch.int64)
        k = torch.tensor(keep, dtype=torch.int64)
        tok = (n - k)[:, None] + torch.arange(span)[None, :]  # the tokens to keep, oldest first
        live = torch.arange(span)[None, :] < k[:, None]
        rows = torch.arange(self.batch)[:, None].expand(-1, span)
        src = self._slots(rows, tok)[live].to(self.device)
        moved = [t.view(-1, *t.shape[2:])[src] for t in self._tensors()]  # advanced indexing: copies
        self.capacity = capacity
        self._first, self._base = (n - k).tolist(), (n - k).tolist()
        self._ensure(span)
        dst = self._slots(rows, tok)[live].to(self.device)
        for t, m in zip(self._tensors(), moved):
            t.view(-1, *t.shape[2:])[dst] = m

    def _tensors(self) -> list[torch.Tensor]:
        return [self.k_cache, self.v_cache] + ([] if self.static else [self.k_scale, self.v_scale])

    def nbytes(self) -> int:
        n = self.k_cache.numel() * 2
        return n + (0 if self.static else self.k_scale.numel() * 8)
