"""Hugging Face transformers (5.x) integration of the int8 KV cache.

    apply_int8_kv_cache(model, "per_token")              # dynamic per-token-head scales
    apply_int8_kv_cache(model, "per_channel", calib)     # static per-channel scales, calibrated
    out = model.generate(ids, max_new_tokens=32)          # now runs on ptqrt's Int8KVCache

What apply_int8_kv_cache changes on the model (and reattach redoes after load_quantized):
  * each attention module (one per decoder layer, found by its ``layer_idx``) gets a child
    ``kv_quant`` = KVCacheQuant holding the layer's static scales (or none, for per_token);
  * ``config._attn_implementation`` becomes ``ptqrt_int8kv_<previous>`` (previous = sdpa or eager),
    registered in transformers' AttentionInterface (the attention function below) and
    AttentionMaskInterface (the previous implementation's own mask function, unchanged);
  * ``generate`` creates an Int8KVCache where it would have created a DynamicCache (an instance-level
    wrapper of ``_prepare_cache_for_generation``); a cache the user passes is left alone;
  * a forward pre-hook hands each forward's 2-D attention mask to the Int8KVCache (so padding tokens
    are never stored), and gives a forward that asks for a cache (use_cache) but passes none an
    Int8KVCache, as transformers would give it a DynamicCache.

Attention, per layer and forward:
  * a single-token step whose keys come from an Int8KVCache, with no dropout and a mask that
    attends exactly to the stored tokens, runs ``ptqrt.ops.int8_kv_decode_attention`` on the paged
    int8 cache (the new token is written first, so it is read back quantized like the rest);
  * anything else (prefill, several new tokens, a mask the kernel cannot express such as padding in
    the middle of a sequence, dropout, softcapping, sinks) runs the previous implementation.
    Its keys/values: a prefill with an empty cache attends over the prompt's own float K/V (as
    serving runtimes do); otherwise over the dequantized int8 past followed by the new float K/V.
The prompt is quantized into the cache during prefill either way. Sliding-window (and chunked) layers
keep a ring of their window (see Int8KVLayer), as transformers' own sliding layers keep their last
tokens: a decode step past the window still runs the int8 kernel, and memory stays bounded.
"""
from __future__ import annotations

import inspect
import math
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

from .._eval_mode import eval_mode
from ..modules.kv_cache import GRANULARITIES, KVCacheQuant, PagedInt8KV

try:
    from transformers import PreTrainedModel
    from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(f"ptqrt.integrations.hf needs transformers>=5 ({e})") from e

ATTN_PREFIX = "ptqrt_int8kv_"
SUPPORTED_ATTN = ("sdpa", "eager")
CHILD = "kv_quant"
CACHE_NAMES = ("cache", "past_key_values")  # the kwarg was renamed in transformers 5.2x
_TAG = "_ptqrt_int8kv_layer"
_SEEN = "_ptqrt_int8kv_returned"  # on the keys a step that is not fused returns
# The layer the last cache update of this thread was for: an attention call that does not get the keys
# that update returned (the model changed them in between: JetMoe repeats them) is found through it.
_last = threading.local()
# Attention kwargs that change the math in ways the decode kernel does not do.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "attention_bias", "alibi")


# ============================================================================ the cache
class Int8KVLayer(CacheLayerMixin):
    """One attention layer of an Int8KVCache. The paged int8 store holds only the tokens whose
    attention mask was 1 when written; ``valid`` (host bool [B, L], None = all) maps them back to
    transformers' positions, so get_seq_length and the masks see the usual [B, L] layout.

    A sliding-window (or chunked) layer of `window` tokens works as transformers' sliding window
    layer does: the masks cover the last window - 1 positions and the new ones (get_mask_sizes gives
    their offset), and its store is a ring of `window` tokens, so memory stays bounded and each decode
    step still runs the int8 kernel (the ring holds exactly the tokens the step attends to). While
    past states are recorded (assisted decoding, activate_past_recording) the store keeps every token,
    so that crop can go back."""

    is_compileable = False
    is_croppable = True

    def __init__(self, owner: "Int8KVCache", layer_idx: int, quant: Optional[KVCacheQuant],
                 window: Optional[int] = None) -> None:
        super().__init__()
        self.owner, self.layer_idx, self.quant, self.window = owner, layer_idx, quant, window
        self.is_sliding = window is not None
        self.record_past = False
        self.keys_changed = False  # the model changes the keys between the update and its attention
        self.fused_last = False  # the last update returned the new keys alone, tagged for the decode kernel
        self.store: Optional[PagedInt8KV] = None
        self.length = 0
        self.valid: Optional[torch.Tensor] = None
        self.dtype = None

    def __repr__(self) -> str:
        kind = self.quant.granularity if self.quant is not None else "per_token"
        win = f", window={self.window}" if self.window is not None else ""
        return f"Int8KVLayer({self.layer_idx}, {kind}{win}, length={self.length})"

    def _lo(self, length: int) -> int:
        """The first position a step after `length` tokens attends to (0 without a window)."""
        return 0 if self.window is None else max(length - self.window + 1, 0)

    def activate_past_recording(self) -> None:
        self.record_past = True
        if self.store is not None:
            self.store.set_capacity(None)

    # ------------------------------------------------------------------ CacheLayerMixin
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        ks = vs = None
        if self.quant is not None:
            if (h, d) != (self.quant.num_kv_heads, self.quant.head_dim):
                raise ValueError(f"Int8KVCache layer {self.layer_idx}: keys are [B, Hkv={h}, T, D={d}] but the "
                                 f"layer's KVCacheQuant was built for Hkv={self.quant.num_kv_heads}, "
                                 f"D={self.quant.head_dim}")
            if self.quant.is_static:
                ks, vs = self.quant.k_scale, self.quant.v_scale
        ring = self.window if self.window is not None and not self.record_past else None
        max_tokens = self.owner.max_length if ring is None else None
        self.store = PagedInt8KV(b, h, d, key_states.device, self.owner.block_size, ks, vs,
                                 max_tokens=max_tokens, capacity=ring)
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, t, d = key_states.shape
        st = self.store
        if (b, h, d) != (st.batch, st.heads, st.head_dim):
            raise ValueError(f"Int8KVCache layer {self.layer_idx} holds B={st.batch} sequences of Hkv={st.heads}, "
                             f"D={st.head_dim}; got keys of shape {tuple(key_states.shape)}. Use a new cache "
                             f"(or cache.reset()) for a new batch")
        past = self.length
        keep = self.owner._new_token_mask(b, past, t)
        # The first step is never fused: whether the attention gets the keys this update returns (a model
        # may change them in between, which the fused step cannot follow) is found there.
        fused = t == 1 and past > 0 and self.owner._fused() and not self.keys_changed
        # The past positions this step attends to, read before a ring could overwrite them.
        pkv = self.hf_layout(upto=past, lo=self._lo(past)) if past and not fused and self.window else None
        st.append(key_states.transpose(1, 2), value_states.transpose(1, 2), keep)
        if keep is not None or self.valid is not None:
            self.valid = self.owner._shared(("extend", id(keep), past, t), self.valid,
                                            lambda old: _extend(old, keep, b, past, t), keep)
        self.length = past + t
        _last.layer, self.fused_last = weakref.ref(self), fused
        if fused:
            # The attention function reads the paged cache; it finds this layer through the tag.
            setattr(key_states, _TAG, self)
            return key_states, value_states
        if past == 0:
            keys, values = key_states, value_states
        else:
            pk, pv = pkv if pkv is not None else self.hf_layout(upto=past)
            keys, values = torch.cat([pk, key_states], dim=2), torch.cat([pv, value_states], dim=2)
        setattr(keys, _SEEN, self)
        return keys, values

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        lo = self._lo(self.length)
        return self.length - lo + q, lo

    def get_seq_length(self, *args) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self.store, self.valid, self.length = None, None, 0
        self.is_initialized = False

    def offload(self):  # the paged store stays where it is
        pass

    def prefetch(self):
        pass

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: remove that many tokens. Positive (transformers' legacy form): keep that many.
        A sliding layer's ring cannot go back past what it still holds of the window (as transformers'
        sliding layer, without recorded past states)."""
        n = int(tokens_to_remove)
        remove = -n if n <= 0 else max(0, self.length - n)
        remove = min(remove, self.length)
        if remove == 0 or self.store is None:
            self._trim_recorded()
            return
        keep_len = self.length - remove
        if self.valid is None:
            counts = torch.full((self.store.batch,), remove, dtype=torch.int64)
            needed = torch.full((self.store.batch,), self._lo(keep_len), dtype=torch.int64)
        else:
            counts = self.valid[:, keep_len:].sum(1)
            needed = self.valid[:, :self._lo(keep_len)].sum(1)  # the oldest token the next step reads
        if bool((needed < torch.tensor(self.store.first)).any()):
            raise RuntimeError(f"Int8KVCache layer {self.layer_idx}: cannot crop {remove} tokens: the sliding "
                               f"window's ring of {self.window} tokens no longer holds the ones before them "
                               f"(call cache.activate_past_recording() before steps that may be cropped)")
        if self.valid is not None:
            self.valid = self.owner._shared(("crop", keep_len), self.valid, lambda old: old[:, :keep_len])
        self.store.drop_last(counts)
        self.length -= remove
        self._trim_recorded()

    def _trim_recorded(self) -> None:
        """While past states are recorded (assisted decoding, which crops after every step) a sliding layer
        keeps every token so that crop can go back. After a crop, the tokens before the next step's window
        are forgotten once they are another window's worth: memory stays bounded, as transformers' sliding
        layer's (which keeps the window alone), without moving the window at every step."""
        if not (self.record_past and self.window and self.store is not None):
            return
        lo = self._lo(self.length)
        if self.valid is None:
            keep = torch.full((self.store.batch,), self.length - lo, dtype=torch.int64)
        else:
            keep = self.valid[:, lo:self.length].sum(1)
        if bool((torch.tensor(self.store.held()) > keep + self.window).any()):
            self.store.keep_last(keep)

    def _select(self, index: torch.Tensor) -> None:
        if self.store is None:
            return
        self.store.select(index)
        if self.valid is not None:
            self.valid = self.owner._shared(("select", id(index)), self.valid, lambda old: old[index.cpu()], index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store is not None:
            self._select(torch.arange(self.store.batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.store is None:
            return
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        self._select(idx.to(torch.int64))

    # ------------------------------------------------------------------ for the attention function
    def hf_layout(self, upto: Optional[int] = None, lo: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized (K, V), each [B, Hkv, upto - lo, D] in the model dtype, for transformers'
        positions lo..upto-1 (default: all); positions not stored (padding) are 0 — the mask excludes
        them."""
        upto = self.length if upto is None else upto
        st = self.store
        if self.valid is None:
            valid = torch.ones(st.batch, upto, dtype=torch.bool)
        else:
            valid = self.valid[:, :upto]
        # The stored tokens of positions >= upto come after those below it, so a prefix of `valid`
        # addresses exactly the stored prefix.
        k, v = st.dequantize(valid, lo)
        return k.transpose(1, 2).to(self.dtype), v.transpose(1, 2).to(self.dtype)

    def mask_matches(self, attention_mask) -> bool:
        """Whether `attention_mask` (as given to the attention function for one query, over positions
        lo..length-1) attends to exactly the tokens the store holds, so that the decode kernel computes
        the same thing."""
        lo = self._lo(self.length - 1)
        held = None if self.window is None else self.store.held()
        return self.owner._mask_matches(attention_mask, self.valid, self.store.batch, self.length, lo, held)


class Int8KVCache(Cache):
    """transformers Cache whose layers store K/V as paged int8 (ptqrt.modules.kv_cache.PagedInt8KV).

    Int8KVCache(model, block_size=16, max_length=None). Layers with a KVCacheQuant child (see
    apply_int8_kv_cache) use its granularity and static scales; other layers use dynamic
    per-token-head scales. max_length: tokens a sequence is expected to hold at most, if known
    (generate passes its own): each layer's storage, which grows by doubling, then stops a doubling
    at it (in whole blocks) instead of ending with up to twice what it holds; a longer sequence
    (a cache reused by a later generate, prompt-lookup candidates) grows by doubling again. Usable as
    ``past_key_values=`` / ``cache=`` of forward and generate. On a model not wired by
    apply_int8_kv_cache it still works (keys/values are stored int8 and handed back dequantized),
    but decode runs the model's own attention and padding tokens are stored like any other.
    Beam search (reorder_cache), batch_select_indices, batch_repeat_interleave and crop are supported.
    """

    def __init__(self, model: nn.Module, block_size: int = 16, max_length: Optional[int] = None) -> None:
        config = getattr(model, "config", None)
        if config is None or not isinstance(model, nn.Module):
            raise TypeError(f"Int8KVCache needs a transformers model; got {type(model).__name__}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"Int8KVCache: block_size must be a positive int; got {block_size!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length <= 0):
            raise ValueError(f"Int8KVCache: max_length must be a positive int or None; got {max_length!r}")
        self.block_size, self.max_length = block_size, max_length
        self._config = config
        self._quants = {m.layer_idx: m for m in model.modules() if isinstance(m, KVCacheQuant)}
        text = _text_config(config)
        self._windows = layer_windows(text)
        n = max([getattr(text, "num_hidden_layers", 0) or 0, len(self._windows)] + [i + 1 for i in self._quants])
        self._reset_forward_state()
        super().__init__(layers=[self._new_layer(i) for i in range(n)])

    def _new_layer(self, idx: int) -> Int8KVLayer:
        window = self._windows[idx] if idx < len(self._windows) else None
        return Int8KVLayer(self, idx, self._quants.get(idx), window)

    def activate_past_recording(self) -> None:
        """Keep every token of sliding layers until crop (transformers calls it before assisted decoding)."""
        for layer in self.layers:
            layer.activate_past_recording()

    def __repr__(self) -> str:
        return f"Int8KVCache(block_size={self.block_size}, max_length={self.max_length}, layers={self.layers})"

    # ------------------------------------------------------------------ Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        if layer_idx >= len(self.layers):
            q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
            return q, 0
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self._reset_forward_state()

    def crop(self, tokens_to_remove: int) -> None:
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.batch_select_indices(indices)

    def nbytes(self) -> int:
        """Bytes the int8 values and scales take (allocated capacity)."""
        return sum(layer.store.nbytes() for layer in self.layers if layer.store is not None)

    # ------------------------------------------------------------------ per-forward state
    # Every layer of one forward asks the same questions (which new tokens are real, does this mask
    # attend to exactly the stored tokens); they are answered once and the answers shared, so a
    # decode step costs O(1) host work per layer after the first.
    def _reset_forward_state(self) -> None:
        self._step_src = None  # the 2-D attention mask of the current forward (device), or None
        self._keep_memo = None
        self._shared_memo = None
        self._verdict_memo = None

    def _begin_forward(self, attention_mask) -> None:
        """Remember this forward's attention mask: 2-D [B, past + T], 1 = real token."""
        if attention_mask is self._step_src and attention_mask is not None:
            return  # the base model's hook after the top model's, same forward
        ok = isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
        self._step_src = attention_mask if ok else None
        self._keep_memo = None

    def _new_token_mask(self, b: int, past: int, t: int) -> Optional[torch.Tensor]:
        """Host bool [B, T]: which of the T new tokens are real (None: all of them)."""
        m = self._step_src
        if m is None or tuple(m.shape) != (b, past + t):
            return None
        key = (id(m), past, t)
        if self._keep_memo is not None and self._keep_memo[0] == key:
            return self._keep_memo[1]
        keep = m[:, past:].detach().to("cpu", torch.bool)
        keep = None if bool(keep.all()) else keep
        self._keep_memo = (key, keep, m)
        return keep

    def _fused(self) -> bool:
        """Whether the model's attention is ptqrt's (then a decode step's keys need not be dequantized)."""
        impl = getattr(self._config, "_attn_implementation", None)
        return isinstance(impl, str) and impl.startswith(ATTN_PREFIX)

    def _shared(self, op, old, fn, *pin):
        """fn(old), computed once for all layers holding the same `old` history."""
        key = (op, id(old))
        memo = self._shared_memo
        if memo is not None and memo[0] == key and memo[1] is old:
            return memo[2]
        new = fn(old)
        self._shared_memo = (key, old, new, pin)  # the refs keep the ids in the key alive
        return new

    def _mask_matches(self, mask, valid, b: int, length: int, lo: int = 0, held: Optional[list] = None) -> bool:
        """Whether `mask` (given to the attention function for one decode query, over positions
        lo..length-1) attends to exactly the stored tokens of those positions, which `valid` (host bool
        [B, L], None = all) gives; held: with a ring, the tokens each sequence holds, which must be
        exactly those."""
        memo = self._verdict_memo
        if memo is not None and memo[0] is mask and memo[1] is valid and memo[2] == (length, lo) and memo[3] == held:
            return memo[4]
        window = None if valid is None else valid[:, lo:length]
        keep = _mask_to_keep(mask, b, length - lo)
        if keep is None:
            ok = False
        elif keep is True:
            ok = window is None or bool(window.all())
        elif window is None:
            ok = bool(keep.all())
        else:
            ok = torch.equal(keep, window)
        if ok and held is not None:
            real = [length - lo] * b if window is None else window.sum(1).tolist()
            ok = real == held
        self._verdict_memo = (mask, valid, (length, lo), held, ok)
        return ok


def _extend(old: Optional[torch.Tensor], keep: Optional[torch.Tensor], b: int, past: int, t: int) -> torch.Tensor:
    old = old if old is not None else torch.ones(b, past, dtype=torch.bool)
    new = keep if keep is not None else torch.ones(b, t, dtype=torch.bool)
    return torch.cat([old, new], dim=1)


def _mask_to_keep(mask, b: int, length: int):
    if mask is None:
        return True
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != length \
            or mask.shape[0] not in (1, b):
        return None
    row = mask[:, 0, -1, :]
    if row.dtype == torch.bool:
        keep = row
    else:  # additive float mask: 0 keeps, the dtype's minimum (or -inf) drops; anything else is a bias
        keep = row == 0
        dropped = row <= torch.finfo(row.dtype).min / 2
        if not bool((keep | dropped).all()):
            return None
    return keep.to("cpu").expand(b, length).contiguous()


# ============================================================================ attention
def _previous_fn(prev: str, module: nn.Module):
    if prev == "eager":  # each modeling file has its own eager function, the default it passes
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"ptqrt int8 KV cache: cannot find eager_attention_forward for "
                               f"{type(module).__name__} (module {type(module).__module__})")
        return fn
    return ALL_ATTENTION_FUNCTIONS[prev]


def _make_attention(prev: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        layer = getattr(key, _TAG, None)
        if layer is None:  # not ours (no cache, another cache class, or a step that is not fused)
            _check_keys(module, key)
            return _previous_fn(prev, module)(module, query, key, value, attention_mask, **kwargs)
        _last.layer = None
        try:
            delattr(key, _TAG)
        except AttributeError:
            pass
        if (query.shape[2] == 1 and not kwargs.get("dropout") and not kwargs.get("output_attentions")
                and query.shape[0] == layer.store.batch and all(kwargs.get(k) is None for k in _UNSUPPORTED_KWARGS)
                and layer.mask_matches(attention_mask)):
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = 1.0 / math.sqrt(query.shape[-1])
            out = layer.store.decode(query[:, :, 0], float(scaling))  # [B, Hq, D]
            return out.unsqueeze(1), None  # [B, 1, Hq, D], as transformers' attention functions return
        pk, pv = layer.hf_layout(upto=layer.length - 1, lo=layer._lo(layer.length - 1))
        k = torch.cat([pk, key], dim=2)
        v = torch.cat([pv, value], dim=2)
        return _previous_fn(prev, module)(module, query, k, v, attention_mask, **kwargs)

    attention.__name__ = f"{ATTN_PREFIX}{prev}"
    return attention


def _check_keys(module: nn.Module, key: torch.Tensor) -> None:
    """After a step that is not fused: if the attention of the layer the cache last updated gets other keys
    than the update returned, the model changes them in between, and that layer's later steps are not
    fused (they return past + new keys, which the model then changes as it does here). A fused step
    whose keys were changed cannot be recovered: that raises (the first step of a layer is never fused,
    so only a model that changes its keys from one step to the next gets there)."""
    last = getattr(_last, "layer", None)
    last = last() if last is not None else None  # a weak reference: a cache dropped mid-step is not kept
    returned = getattr(key, _SEEN, None)
    if returned is not None:
        try:
            delattr(key, _SEEN)
        except AttributeError:
            pass
    if last is None or getattr(module, "layer_idx", None) != last.layer_idx:
        return
    _last.layer = None
    if returned is last:
        return
    if last.fused_last:
        raise NotImplementedError(
            f"ptqrt int8 KV cache: {type(module).__name__} (layer {last.layer_idx}) changed the keys between the "
            f"cache update and its attention on a decode step after leaving them alone before; the int8 decode "
            f"kernel cannot follow that. remove_int8_kv_cache(model) and pass Int8KVCache(model) as "
            f"past_key_values (it returns dequantized keys), or quantize without kv_cache_dtype='int8'")
    last.keys_changed = True


def _register(prev: str) -> str:
    name = ATTN_PREFIX + prev
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention(prev))
    if name not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[prev])
    return name


def _previous_impl(model: nn.Module) -> str:
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl.startswith(ATTN_PREFIX):
        impl = impl[len(ATTN_PREFIX):]
    if impl not in SUPPORTED_ATTN:
        raise ValueError(f"ptqrt int8 KV cache: attention implementation {impl!r} is not supported; use one of "
                         f"{SUPPORTED_ATTN} (e.g. from_pretrained(..., attn_implementation='sdpa'))")
    return impl


# ============================================================================ finding layers
def _require_hf(model, fn: str) -> None:
    """fn: the caller, a function of this module ("reattach") or a qualified name ("ptqrt.quantize")."""
    where = fn if "." in fn else f"ptqrt.integrations.hf.{fn}"
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{where}: needs a transformers PreTrainedModel; got "
                        f"{type(model).__name__}. The int8 KV cache plugs into transformers' Cache and attention "
                        f"interfaces, so other models have to call ptqrt.ops.kv_cache_append / "
                        f"int8_kv_decode_attention themselves")
    if getattr(model.config, "is_encoder_decoder", False):
        raise NotImplementedError(f"ptqrt int8 KV cache: encoder-decoder models ({type(model).__name__}) are not "
                                  f"supported; decoder-only models are")


def attention_modules(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """{layer_idx: (name, module)} of the self-attention modules that write the KV cache."""
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, mod in model.named_modules():
        idx = getattr(mod, "layer_idx", None)
        if isinstance(mod, KVCacheQuant) or isinstance(idx, bool) or not isinstance(idx, int):
            continue
        kind = type(mod).__name__.lower()
        if "attention" not in kind or kind.endswith(("layer", "block")) or getattr(mod, "is_cross_attention", False):
            continue  # a decoder layer named after its attention (Mllama's, Jamba's) is not one itself
        if "crossattention" in kind:
            raise NotImplementedError(f"ptqrt int8 KV cache: {name!r} ({type(mod).__name__}) is a cross-attention "
                                      f"layer that keeps its keys in the decoder's cache (layer_idx {idx}); the int8 "
                                      f"KV cache stores self-attention layers only")
        if idx in found:
            raise ValueError(f"ptqrt int8 KV cache: two attention modules claim layer_idx {idx}: "
                             f"{found[idx][0]!r} and {name!r}")
        found[idx] = (name, mod)
    return found


_WINDOWED = ("sliding_attention", "chunked_attention")
_MISSING = object()


def _text_config(config):
    """The decoder's config (a vision-language model's text config; the config itself otherwise)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _refuse_odd(types, config) -> None:
    odd = sorted({t for t in types if t not in ("full_attention",) + _WINDOWED})
    if odd:
        raise NotImplementedError(f"the int8 KV cache stores full and sliding-window attention layers only; "
                                  f"{type(config).__name__} has layers of type {odd}")


def layer_windows(config) -> list:
    """Per decoder layer: None (full attention) or the window of a sliding (or chunked) attention
    layer, as transformers' DynamicCache lays out its layers. NotImplementedError for other kinds
    (linear attention, layers sharing another's cache), which the int8 KV cache does not store."""
    modes = list(getattr(config, "kv_sharing_modes", None) or [])
    if "reuse" in modes:
        raise NotImplementedError(f"the int8 KV cache does not store layers that share another's cache "
                                  f"(kv_sharing_modes 'reuse' of {type(config).__name__})")
    if "store" in modes:  # the keys its update returns are published for others to read, whole
        raise NotImplementedError(f"the int8 KV cache does not store layers whose keys other layers or models read "
                                  f"from the cache (kv_sharing_modes 'store' of {type(config).__name__})")
    try:  # transformers' own reading (per-layer configs included), where this version has it
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:
        get_layer_types_and_kwargs = None
    if get_layer_types_and_kwargs is not None and hasattr(config, "per_layer_config"):
        types, kwargs = get_layer_types_and_kwargs(config)
        _refuse_odd(types, config)
        return [int(kw["sliding_window"]) if t in _WINDOWED and kw.get("sliding_window") is not None else None
                for t, kw in zip(types, kwargs)]
    types = getattr(config, "layer_types", None)
    n = getattr(config, "num_hidden_layers", None) or (len(types) if types else 0)
    if types is None:
        if getattr(config, "sliding_window", None) is not None:
            types = ["sliding_attention"] * n
        elif getattr(config, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * n
        else:
            return [None] * n
    _refuse_odd(types, config)
    out = []
    for t in types:
        w = None
        if t == "sliding_attention":
            w = getattr(config, "sliding_window", None)
        elif t == "chunked_attention":
            w = getattr(config, "attention_chunk_size", None)
        out.append(int(w) if w is not None else None)
    return out


def _geometry(model: nn.Module, mod: nn.Module) -> tuple[int, int]:
    cfg = _text_config(model.config)
    heads = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(mod, "head_dim", None) or getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return int(hkv), int(d)


def _device_of(mod: nn.Module) -> torch.device:
    for t in list(mod.parameters()) + list(mod.buffers()):
        return t.device
    return torch.device("cpu")


def _cache_kwarg(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# ============================================================================ calibration
class _AbsmaxRecorder(DynamicCache):
    """A DynamicCache that records, per layer, absmax over tokens of the K/V it is handed ([Hkv, D]),
    i.e. exactly what a cache stores (after RoPE). Padding tokens (mask 0) are left out."""

    def __init__(self, config):
        super().__init__(config=config)
        self.absmax: dict[int, list] = {}
        self.token_mask: Optional[torch.Tensor] = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        m = self.token_mask
        t = key_states.shape[2]
        stats = []
        for x in (key_states, value_states):
            a = x.detach().abs().to(torch.float32)
            if m is not None and tuple(m.shape) == (x.shape[0], t):
                a = a * m.to(a.device, a.dtype)[:, None, :, None]
            stats.append(torch.nan_to_num(a, nan=0.0).amax(dim=(0, 2)))
        prev = self.absmax.get(layer_idx)
        self.absmax[layer_idx] = stats if prev is None else [torch.maximum(p, s) for p, s in zip(prev, stats)]
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@torch.no_grad()
def calibrate_kv(model: nn.Module, calib_data, quiet: bool = False) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer_idx: (k_absmax, v_absmax)}, float32 [Hkv, D] each, over every calibration token."""
    from tqdm.auto import tqdm

    from ..calibrate import model_device, to_device, token_mask

    if isinstance(calib_data, (torch.Tensor, Mapping)):
        calib_data = [calib_data]
    name = _cache_kwarg(model)
    device = model_device(model)
    rec = None
    seen = 0
    with eval_mode(model):
        for sample in tqdm(calib_data, desc="calibrating KV cache", unit="sample", disable=quiet):
            sample = to_device(sample, device)
            cur = _AbsmaxRecorder(model.config)
            if rec is not None:
                cur.absmax = rec.absmax
            rec = cur
            extra = {name: rec, "use_cache": True}
            if isinstance(sample, Mapping):
                rec.token_mask = token_mask(sample)
                model(**{**sample, **extra})
            elif isinstance(sample, (tuple, list)):
                model(*sample, **extra)
            else:
                model(sample, **extra)
            seen += 1
    if seen == 0:
        raise ValueError("calib_data is empty: static KV-cache scales need at least one sample")
    return {i: (k, v) for i, (k, v) in rec.absmax.items()}


# ============================================================================ wiring
class _ForwardHook:
    """The forward pre-hook of a wired model (a class at module level, so a wired model pickles): it makes
    an Int8KVCache where the call asks for a cache and gives none (inject), and tells the cache a
    forward begins, with its attention mask."""

    _ptqrt_int8kv = True  # found again by _our_hooks; it holds no reference to the model

    def __init__(self, top: nn.Module, inject: bool) -> None:
        params = list(inspect.signature(top.forward).parameters.values())
        self.positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.cache_kw = "cache" if "cache" in self.positional or any(p.name == "cache" for p in params) \
            else "past_key_values"
        self.inject = inject

    def __call__(self, module, args, kwargs):
        _last.layer = None  # a step that failed between an update and its attention leaves nothing behind
        positional, cache_kw = self.positional, self.cache_kw
        given = dict(zip(positional, args))
        given.update(kwargs)
        cache = next((given[n] for n in CACHE_NAMES if given.get(n) is not None), None)
        if cache is None and self.inject and _is_wired(module):
            use = given.get("use_cache")
            if use is None:
                use = getattr(module.config, "use_cache", False)
            if use and not getattr(module.config, "is_encoder_decoder", False):
                cache = Int8KVCache(module)
                if cache_kw in positional and positional.index(cache_kw) < len(args):
                    args = list(args)
                    args[positional.index(cache_kw)] = cache
                    args = tuple(args)
                else:
                    kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_NAMES}
                    kwargs[cache_kw] = cache
        if isinstance(cache, Int8KVCache):
            cache._begin_forward(given.get("attention_mask"))
        return args, kwargs


def _forward_hook(top: nn.Module, inject: bool) -> _ForwardHook:
    return _ForwardHook(top, inject)


def _our_hooks(m: nn.Module) -> list:
    return [k for k, fn in m._forward_pre_hooks.items() if getattr(fn, "_ptqrt_int8kv", False)]


def _drop_hooks(m: nn.Module) -> None:
    for k in _our_hooks(m):
        del m._forward_pre_hooks[k]
        getattr(m, "_forward_pre_hooks_with_kwargs", {}).pop(k, None)


def _prepare_cache_for_generation(self, *args, **kwargs):
    """generate() step 7, wrapped: where transformers made a DynamicCache, make an Int8KVCache."""
    fn = type(self)._prepare_cache_for_generation
    try:
        bound = inspect.signature(fn).bind(self, *args, **kwargs).arguments
    except TypeError:
        bound = {}
    model_kwargs = bound.get("model_kwargs")
    length = bound.get("max_cache_length")  # tokens the cache will hold at most (max_length - 1)
    length = length if isinstance(length, int) and not isinstance(length, bool) and length > 0 else None
    if not isinstance(model_kwargs, dict):
        return fn(self, *args, **kwargs)
    user = any(model_kwargs.get(n) is not None for n in CACHE_NAMES)
    out = fn(self, *args, **kwargs)
    if not user and _is_wired(self):
        for n in CACHE_NAMES:
            c = model_kwargs.get(n)
            if type(c) is DynamicCache and not getattr(c, "offloading", False):
                new = model_kwargs[n] = Int8KVCache(self, max_length=length)
                if any(getattr(layer, "record_past", False) for layer in c.layers):
                    new.activate_past_recording()  # an assistant model's cache: its drafts get cropped
            elif c is not None and not isinstance(c, Int8KVCache):
                # a cache generate was asked for (cache_implementation="static", an offloaded one): kept
                warnings.warn(f"ptqrt int8 KV cache: generate made a {type(c).__name__}, which this model keeps; "
                              f"only the default DynamicCache is replaced by Int8KVCache, so this run stores float "
                              f"keys and values (leave cache_implementation unset, or pass "
                              f"past_key_values=Int8KVCache(model))", RuntimeWarning, stacklevel=3)
    return out


def _is_wired(model: nn.Module) -> bool:
    impl = getattr(model.config, "_attn_implementation", None)
    return isinstance(impl, str) and impl.startswith(ATTN_PREFIX)


def _wire(model: nn.Module, prev: str) -> None:
    name = _register(prev)
    configs = {id(model.config): model.config}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if isinstance(m, PreTrainedModel) and cfg is not None:
            configs[id(cfg)] = cfg
    for cfg in configs.values():
        cfg._attn_implementation = name
    # Re-registered each time (a deepcopy carries the old hooks along; the top model may differ).
    for m in [model] + [m for m in model.modules() if isinstance(m, PreTrainedModel)]:
        _drop_hooks(m)
    for m in [model] + [m for m in model.modules() if isinstance(m, PreTrainedModel) and m is not model]:
        params = inspect.signature(m.forward).parameters
        if "attention_mask" in params and any(n in params for n in CACHE_NAMES):
            m.register_forward_pre_hook(_forward_hook(m, inject=m is model), with_kwargs=True)
    if hasattr(type(model), "_prepare_cache_for_generation"):
        model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)


def check_int8_kv_cache(model: nn.Module, fn: str = "apply_int8_kv_cache") -> tuple[str, dict]:
    """Raise (TypeError / ValueError / NotImplementedError) unless `model` can take the int8 KV cache: a
    decoder-only transformers PreTrainedModel with "sdpa" or "eager" attention and attention modules
    that carry a layer_idx. Changes nothing; returns (attention implementation, attention_modules).
    quantize() calls it before calibrating or swapping anything."""
    _require_hf(model, fn)
    name = type(model).__name__
    # A decode step hands the attention function the new token's key only; the cache's history reaches
    # attention through transformers' attention interface. Models that run their own attention
    # (Bloom, Falcon, MPT, XGLM) would attend over that one key.
    if not getattr(type(model), "_supports_attention_backend", False):
        raise NotImplementedError(f"{fn}: {name} computes attention itself, not through transformers' "
                                  f"attention interface, which the int8 KV cache plugs into")
    if getattr(model.config, "kv_lora_rank", None):  # multi-head latent attention: its cache is no K/V per head
        raise NotImplementedError(f"{fn}: {name} uses multi-head latent attention (kv_lora_rank="
                                  f"{model.config.kv_lora_rank}); the int8 KV cache stores keys and values per kv head")
    prev = _previous_impl(model)
    try:
        layer_windows(_text_config(model.config))
    except NotImplementedError as e:
        raise NotImplementedError(f"{fn}: {e}") from None
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"{fn}: found no attention module with a layer_idx in {name}")
    return prev, mods


def check_reattach(model: nn.Module, layers: Mapping[str, int]) -> str:
    """Raise (TypeError / ValueError / NotImplementedError) unless reattach(model) will succeed once
    a KVCacheQuant is set at each name of `layers` ({"<attention module>.kv_quant": layer_idx}, as
    load_quantized reads them from a packed directory). Changes nothing; returns the attention
    implementation the wiring wraps. reattach runs these same checks on the children it finds."""
    prev, mods = check_int8_kv_cache(model, "reattach")
    if not layers:
        raise ValueError(f"reattach: no KVCacheQuant to attach to {type(model).__name__}")
    by_name = {name: idx for idx, (name, _) in mods.items()}
    for name, idx in layers.items():
        parent, _, child = name.rpartition(".")
        if child != CHILD or parent not in by_name:
            some = sorted(by_name)
            raise ValueError(f"reattach: {name!r} is not the '{CHILD}' child of an attention module of "
                             f"{type(model).__name__} (its attention modules: {some[:3]}"
                             f"{' ...' if len(some) > 3 else ''})")
        if by_name[parent] != idx:
            raise ValueError(f"reattach: {name} was built for layer_idx {idx}, but {parent} is layer {by_name[parent]}")
    return prev


def apply_int8_kv_cache(model: nn.Module, granularity: str, calib_data=None, quiet: bool = False) -> nn.Module:
    """Give a transformers decoder-only model an int8 KV cache, in place; returns the model.

    granularity: "per_token" (dynamic per-token-head scales, computed as tokens are written) or
    "per_channel" (static per (kv head, channel) scales: absmax over calib_data's tokens of the K/V
    as stored in the cache, / 127, 0 -> 1). calib_data: an iterable of model inputs (tensor, tuple
    of positional args, or dict of kwargs; a dict's 2-D attention_mask leaves padding out), needed
    for per_channel. The attention implementation must be "sdpa" or "eager".
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"apply_int8_kv_cache: granularity must be one of {GRANULARITIES}; got {granularity!r}")
    prev, mods = check_int8_kv_cache(model)
    stats = {}
    if granularity == "per_channel":
        if calib_data is None:
            raise ValueError("apply_int8_kv_cache: granularity='per_channel' (static scales) needs calib_data")
        stats = calibrate_kv(model, calib_data, quiet=quiet)
        silent = sorted(set(mods) - set(stats))
        if silent:
            raise ValueError(f"apply_int8_kv_cache: calibration never wrote the cache of layers {silent[:5]}"
                             f"{' ...' if len(silent) > 5 else ''}, so they cannot get static scales")
    built = {}
    for idx, (name, mod) in sorted(mods.items()):
        dev = _device_of(mod)
        if granularity == "per_channel":
            k, v = stats[idx]
            built[idx] = KVCacheQuant.from_absmax(k.to(dev), v.to(dev), idx)
        else:
            hkv, d = _geometry(model, mod)
            built[idx] = KVCacheQuant("per_token", hkv, d, idx, device=dev)
    # Nothing above changed the model; from here a failure (or an interrupt) puts it back as it was.
    old = {idx: mod._modules.get(CHILD, _MISSING) for idx, (_, mod) in mods.items()}
    was_wired = _is_wired(model)
    try:
        for idx, (_, mod) in mods.items():
            setattr(mod, CHILD, built[idx])
        _wire(model, prev)
    except BaseException:
        for idx, (_, mod) in mods.items():
            if old[idx] is _MISSING:
                mod._modules.pop(CHILD, None)
            else:
                setattr(mod, CHILD, old[idx])
        (_wire if was_wired else _unwire)(model, prev)
        raise
    return model


def reattach(model: nn.Module) -> nn.Module:
    """Redo apply_int8_kv_cache's attention/generate wiring on a model whose KVCacheQuant children
    were re-created (load_quantized). Returns the model."""
    _require_hf(model, "reattach")
    layers = {f"{name}.{CHILD}": q.layer_idx for name, mod in attention_modules(model).values()
              if isinstance(q := getattr(mod, CHILD, None), KVCacheQuant)}
    if not layers:
        raise ValueError(f"reattach: no attention module of {type(model).__name__} has a KVCacheQuant "
                         f"'{CHILD}' child; call apply_int8_kv_cache first (or load a model saved with one)")
    _wire(model, check_reattach(model, layers))
    return model


def remove_int8_kv_cache(model: nn.Module) -> nn.Module:
    """Undo apply_int8_kv_cache: drop the KVCacheQuant children, hooks and generate wrapper, and give the
    attention implementation back."""
    _require_hf(model, "remove_int8_kv_cache")
    prev = _previous_impl(model)
    for _, mod in attention_modules(model).values():
        if hasattr(mod, CHILD):
            delattr(mod, CHILD)
    _unwire(model, prev)
    return model


def _unwire(model: nn.Module, prev: str) -> None:
    """Undo _wire: hooks, the generate wrapper, and the attention implementation `prev` back."""
    for m in [model] + list(model.modules()):
        _drop_hooks(m)
    model.__dict__.pop("_prepare_cache_for_generation", None)
    for m in [model] + list(model.modules()):
        cfg = getattr(m, "config", None)
        if cfg is not None and str(getattr(cfg, "_attn_implementation", "")).startswith(ATTN_PREFIX):
            cfg._attn_implementation = prev


__all__ = ["Int8KVCache", "Int8KVLayer", "apply_int8_kv_cache", "reattach", "remove_int8_kv_cache",
           "attention_modules", "calibrate_kv", "check_int8_kv_cache", "check_reattach"]
