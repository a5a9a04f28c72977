"""Calibration one block at a time: SmoothQuant / OSL smoothing, static scales and GPTQ.

For a decoder model the blocks are its layers. One pass over the calibration data records the call
(args and kwargs) the model makes to each layer: its own attention mask and position embeddings,
which differ between sliding and full attention layers. Only layer 0 runs in that pass; the others
are stood in for. Then each layer is moved to the compute device, observed in float, quantized, and
run again quantized to make the next layer's inputs — so one layer and its activations are on the
device at a time (the rest stays where it is, e.g. on the CPU). Layers always run without a KV cache.
Linears outside the layers (a pooler, an unskipped lm_head) are done afterwards with the whole model
as the block. A model without a layer stack is one block.

Within a block, linears that read the same input tensor form a group (q/k/v, gate/up): they share
one smoothing vector s. 1/s is folded into the LayerNorm/RMSNorm that produced that input when the
norm runs once in the block, shares no parameter with another module, feeds nothing but the group,
applies its weight in a form the fold knows (x̂·γ + β or x̂·(1 + γ) + β, found by probing the norm),
and a trial fold leaves every output of the block unchanged. Otherwise QuantLinear divides its input
by s inside the quantize op.

Fused MoE experts (transformers' experts modules, one 3-D tensor a projection) are observed through
their float forward in ptqrt's order of operations (hf_experts.observed_forward), which records each
expert projection's input rows: every expert gets its own statistics, smoothing vector (never folded:
the norm in front feeds the router and every expert), static scale and GPTQ Hessian.

A block changes only once every decision is made and every QuantLinear is built, and the model's
parameters are never written but for a folded norm's: a linear's smoothed weight W·s is a copy, since
the linear's Parameter may be tied to another module (GPT-2's lm_head and wte).
"""
from __future__ import annotations

import copy
import math
import sys
import warnings
from collections import Counter, defaultdict
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .algorithms import gptq, osl, smoothquant
from .calibrate import run_sample, to_device, token_mask
from .config import PTQConfig
from .modules.linear import QuantLinear, is_quantizable, linear_weight
from .observers import MinMaxObserver, RowSample, static_range

KEPT_TOKENS = 2048  # calibration tokens kept per target for OSL's α search and percentile scales (RowSample)
CACHE_KWARGS = ("cache", "past_key_value", "past_key_values", "layer_past")  # names across transformers versions
NORM_OFFSETS = (0.0, 1.0)  # norms that scale by γ, and by (1 + γ)


class _Captured(Exception):
    pass


# ============================================================================ the layer stack
def _config_layers(model: nn.Module) -> Optional[int]:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    n = getattr(cfg, "num_hidden_layers", None)
    return n if isinstance(n, int) else None


def _decoder_prefix(model: nn.Module) -> Optional[str]:
    """The name of the model's text decoder (transformers' get_decoder(): a vision-language model's
    language model) with a trailing dot; "" for the model itself, None where there is none."""
    get = getattr(model, "get_decoder", None)
    try:
        dec = get() if callable(get) else None
    except Exception:  # noqa: BLE001 - a model without one may raise anything here
        return None
    if not isinstance(dec, nn.Module):
        return None
    return next((f"{n}." if n else "" for n, m in model.named_modules() if m is dec), None)


def decoder_layers(model: nn.Module, targets) -> Optional[tuple[str, nn.ModuleList]]:
    """The layer stack: the outermost ModuleList of distinct same-class blocks holding target linears.

    A list as long as the model's config.num_hidden_layers comes first, then one inside the model's
    text decoder (a vision tower's blocks may be as many), then the shallowest (an MoE layer's expert
    list is deeper, and may be longer), then the longest."""
    n_layers = _config_layers(model)
    dec = _decoder_prefix(model)
    found = []
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(m) for m in mod}) == 1
                and len({id(m) for m in mod}) == len(mod) and not is_quantizable(mod[0])):
            continue
        if any(t.startswith(f"{name}.") for t in targets):
            outside = dec is not None and not f"{name}.".startswith(dec)
            found.append(((len(mod) != n_layers, outside, name.count("."), -len(mod)), name, mod))
    if not found:
        return None
    _, name, mod = min(found, key=lambda f: f[0])
    return name, mod


def _as_call(sample) -> tuple[tuple, dict]:
    if isinstance(sample, Mapping):
        return (), dict(sample)
    if isinstance(sample, (tuple, list)):
        return tuple(sample), {}
    return (sample,), {}


def _cache_types() -> tuple:
    """transformers' Cache base class, once transformers is loaded (without it no model has one)."""
    mod = sys.modules.get("transformers.cache_utils")
    return (mod.Cache,) if mod is not None and hasattr(mod, "Cache") else ()


def _drop_caches(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Calibration never fills a KV cache: every transformers Cache among the arguments, whatever its
    name or position (GPT-2 passes it positionally; its kwarg is `cache` since transformers 5.2x), and
    whatever sits under a cache's known names becomes None; use_cache becomes False."""
    types = _cache_types()
    args = tuple(None if isinstance(a, types) else a for a in args)
    kwargs = {k: None if k in CACHE_KWARGS or isinstance(v, types) else v for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def _hidden(out):
    """The hidden state in a layer's (or the model's) output: the tensor, or its first entry."""
    while not isinstance(out, torch.Tensor):
        if isinstance(out, Mapping) and out:
            out = next(iter(out.values()))
        elif isinstance(out, (tuple, list)) and out:
            out = out[0]
        else:
            raise TypeError(f"cannot find the hidden state in a block's output of type {type(out).__name__}")
    return out


def _with_hidden(call: tuple[tuple, dict], hidden) -> tuple[tuple, dict]:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    if not kwargs:
        raise ValueError("a layer was called without arguments: there is no hidden state to calibrate on")
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return args, {**kwargs, key: hidden}


def _stand_in(i: int, n: int, real_forward, per_layer: list, state: dict):
    """Layer i's forward for the capture pass: records its call without caches; layer 0 runs as the
    model called it (its cache included, so its output has the form the model's loop reads, e.g. a
    present key/value the loop collects when use_cache is on), the others return layer 0's output; the
    last one ends the model's run."""
    def forward(*args, **kwargs):
        state["order"].append(i)
        call = _drop_caches(args, kwargs)
        if i == 0:
            per_layer[0].append(call)
            state["out"] = real_forward(*args, **kwargs)
        else:
            per_layer[i].append(_with_hidden(call, None))  # the walk fills in the real hidden state
        if i == n - 1:
            raise _Captured
        return state["out"]
    return forward


@torch.no_grad()
def capture_layer_calls(model: nn.Module, lname: str, layers: nn.ModuleList, calib_data,
                        quiet: bool, reached: Optional[list] = None) -> list[list[tuple[tuple, dict]]]:
    """Per layer, per calibration sample, the (args, kwargs) the model calls the layer with, caches
    dropped (layer 0's with its input; later layers' with None for the hidden state). One pass that
    runs layer 0 only. Layers the model never reaches are left off the end of the list. reached, if
    given, gets the index in calib_data of each sample whose calls were recorded."""
    from tqdm.auto import tqdm

    from .calibrate import model_device

    n = len(layers)
    per_layer: list = [[] for _ in range(n)]
    state = {"order": [], "out": None}
    saved = [layer.__dict__.get("forward") for layer in layers]  # an instance-level forward (accelerate)
    real0 = layers[0].forward
    device = model_device(model)
    orders = []
    try:
        for i, layer in enumerate(layers):
            layer.forward = _stand_in(i, n, real0, per_layer, state)
        for sample in tqdm(calib_data, desc="capturing layer inputs", unit="sample", disable=quiet, leave=False):
            state["order"], state["out"] = [], None
            try:
                run_sample(model, to_device(sample, device))
            except _Captured:
                pass
            orders.append(state["order"])
            if reached is not None and state["order"]:
                reached.append(len(orders) - 1)
    finally:
        restore_forwards(layers, saved)
    return per_layer[:_layers_reached(orders, lname)]


def restore_forwards(mods, saved: list) -> None:
    """Give each module of `mods` back the instance-level forward it had (saved[i], from
    ``mod.__dict__.get("forward")``; None: none, its class's forward)."""
    for mod, f in zip(mods, saved):
        if f is None:
            mod.__dict__.pop("forward", None)
        else:
            mod.forward = f


def _layers_reached(orders: list[list[int]], lname: str) -> int:
    """How many layers every sample ran, in order, once each (samples that never reached layer 0 aside)."""
    runs = [o for o in orders if o]
    if not runs:
        raise ValueError(f"calibration never reached {lname}.0: check calib_data")
    for o in runs:
        if o != list(range(len(o))):
            raise ValueError(f"layer-by-layer calibration needs the model to run {lname}.0, {lname}.1, ... once each "
                             f"and in order; one sample ran them in the order {o}")
    if len({len(o) for o in runs}) > 1:
        raise ValueError(f"layer-by-layer calibration needs every sample to run the same layers; samples stopped "
                         f"after {sorted({len(o) for o in runs})} layers of {lname}")
    return len(runs[0])


def _token_mask(sample) -> Optional[torch.Tensor]:
    """The real (not padding) tokens of a calibration sample as bool [B, T], or None (every token counts)."""
    mask = token_mask(sample)
    return None if mask is None else mask.bool()


def _real_rows(x: torch.Tensor, mask: Optional[torch.Tensor], ordered: bool = False) -> torch.Tensor:
    """x [..., K] as rows [R, K], without the padding positions where `mask` [B, T] lines up with x's
    leading dimensions (a layer's input [B, T, K]), or where x is [B * T, K] with its rows in token order
    (`ordered`: see _observe); every row otherwise."""
    x2 = x.detach().reshape(-1, x.shape[-1])
    if mask is not None and (tuple(x.shape[:-1]) == tuple(mask.shape) or ordered):
        return x2[mask.reshape(-1).to(x2.device)]
    return x2


def _shared_params(model: nn.Module) -> set:
    """ids of the parameters the model reaches under more than one name (tied, or in a shared module)."""
    seen = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {i for i, c in seen.items() if c > 1}


# ============================================================================ observing a block
class _Stats:
    """What the float pass over a block records per target linear and per input tensor."""

    def __init__(self):
        self.observers: dict[str, MinMaxObserver] = defaultdict(MinMaxObserver)
        self.absmax: dict[str, torch.Tensor] = {}  # per input channel, filled from the observers
        self.hessian: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = defaultdict(int)
        self.xs: dict = {}  # target -> RowSample, for OSL and percentile scales
        self.input_key: dict[str, tuple] = {}        # linear -> identity of its input tensor (first sample)
        self.producer: dict[tuple, nn.Module] = {}   # tensor identity -> norm module that produced it
        self.norm_calls: Counter = Counter()         # norm module -> times it ran (first sample)
        self.readers: dict[tuple, set] = defaultdict(set)  # tensor identity -> every module that read it
        # Identities are storage addresses: the first pass holds every tensor it keyed, so that no
        # freed activation's address is reused by another tensor and mistaken for it.
        self.alive: list = []
        # GPTQ of fused experts in rounds (layerwise_experts.expert_rounds): the experts whose Hessians this
        # pass accumulates (None: all), and whether it records nothing else (a later round's pass).
        self.hessian_experts: Optional[set] = None
        self.hessians_only = False


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.dtype)


def _percentile(cfg: PTQConfig) -> Optional[float]:
    """The quantile a static scale is taken at (None: the max, which the observers give exactly)."""
    return cfg.act_percentile if cfg.act_observer == "percentile" and cfg.act_percentile < 1.0 else None


def _record(st: _Stats, key, x2: torch.Tensor, cfg: PTQConfig) -> None:
    """What calibration keeps of input rows x2 [R, K] of target `key` (a linear's name, or an expert
    projection's (module, projection, expert))."""
    expert = isinstance(key, tuple)
    if cfg.precision_recovery == "gptq" and (
            st.hessian_experts is None or (expert and key[2] in st.hessian_experts) or (not expert and not st.hessians_only)):
        st.hessian[key], st.tokens[key] = gptq.accumulate_hessian(st.hessian.get(key), x2, st.tokens[key])
    if st.hessians_only:
        return
    st.observers[key].update(x2)
    if cfg.outliers == "osl" or _percentile(cfg) is not None:
        if key not in st.xs:
            st.xs[key] = RowSample(KEPT_TOKENS)
        st.xs[key].add(x2)


def _observe(block: nn.Module, prefix: str, names: dict[str, PTQConfig], calls, device, quiet: bool,
             masks: Optional[list] = None, experts: Optional[dict] = None, hessian_experts: Optional[set] = None,
             hessians_only: bool = False) -> _Stats:
    """Records what quantizing the targets needs from a float pass over `calls`; masks (one per call,
    `_token_mask`) leave padding positions out of the observers, Hessians and OSL samples. experts
    ({name: (module, config)}): fused experts modules observed per expert (layerwise_experts.observing).
    hessian_experts: the experts whose GPTQ Hessians this pass accumulates (None: every one);
    hessians_only: record those alone (a later round of layerwise_experts.expert_rounds)."""
    from tqdm.auto import tqdm

    from .layerwise_experts import observing

    st = _Stats()
    st.hessian_experts, st.hessians_only = hessian_experts, hessians_only
    cur = {"mask": None, "flat": set(), "stack": []}  # the call's mask, token-ordered inputs, calls in flight
    handles = []
    first = [True]
    by_module = {}
    for full in names:
        by_module[block.get_submodule(_rel(full, prefix))] = full

    rel_name = {mod: n for n, mod in block.named_modules()}

    def pre(mod, args, kwargs):
        if first[0]:  # who reads which tensor decides whether 1/s may be folded into a norm
            for t in list(args) + list(kwargs.values()):
                if isinstance(t, torch.Tensor):
                    st.readers[_key(t)].add(rel_name[mod])
                    st.alive.append(t)
        # A 2-D input [B * T, K] has its rows in token order (so padding can be masked) where it is a
        # view of a [B, T, K] tensor some module of the block was called with (the flattened input an
        # MoE block gives its shared expert), or where the module calling this one was called with such
        # an input (the shared expert's down_proj). A row gather (x[tokens], routed experts) is not.
        mask, x = cur["mask"], args[0] if args else next(iter(kwargs.values()), None)
        ordered = False
        if mask is not None:
            cur["flat"].update(t.data_ptr() for t in list(args) + list(kwargs.values())
                               if isinstance(t, torch.Tensor) and t.dim() == 3 and t.is_contiguous()
                               and tuple(t.shape[:2]) == tuple(mask.shape))
            ordered = isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] == mask.numel() and (
                (x.is_contiguous() and x.data_ptr() in cur["flat"]) or (bool(cur["stack"]) and cur["stack"][-1]))
        cur["stack"].append(ordered)
        full = by_module.get(mod)
        if full is None:
            return
        cfg = names[full]
        if first[0]:
            st.input_key[full] = _key(x)
        x2 = _real_rows(x, mask, ordered)
        if x2.shape[0]:
            _record(st, full, x2, cfg)

    def post(mod, _args, out):
        if first[0] and isinstance(out, torch.Tensor):
            st.norm_calls[mod] += 1
            st.producer[_key(out)] = mod
            st.alive.append(out)

    def pop(_mod, _args, _out):
        cur["stack"].pop()

    for mod in block.modules():
        if mod is block:
            continue
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(pop, always_call=True))
        if _is_norm(mod):
            handles.append(mod.register_forward_hook(post))
    try:
        with observing(block, prefix, experts or {}, st, cur):
            for i, (args, kwargs) in enumerate(tqdm(calls, desc="observing", unit="sample", disable=quiet, leave=False)):
                cur.update(mask=masks[i] if masks else None, flat=set(), stack=[])
                block(*to_device(args, device), **to_device(kwargs, device))
                first[0] = False
    finally:
        for h in handles:
            h.remove()
        st.alive.clear()
    st.absmax = {n: o.channel_absmax for n, o in st.observers.items() if o.channel_absmax is not None}
    return st


def _is_norm(mod: nn.Module) -> bool:
    """A LayerNorm/RMSNorm with a per-channel weight (how it applies that weight is probed before a fold)."""
    w = getattr(mod, "weight", None)
    return type(mod).__name__.endswith(("LayerNorm", "RMSNorm")) and isinstance(w, torch.Tensor) and w.dim() == 1


def never_reached(what: str, static: bool) -> None:
    """Calibration never ran `what`: an error under static W8A8, which needs its input range; a warning
    otherwise (quantized without statistics)."""
    if static:
        raise ValueError(f"calibration never reached {what}: static W8A8 (act_granularity='per_tensor') needs every "
                         f"layer's input range. Give calib_data that runs them (an MoE model needs tokens routed to "
                         f"every expert), or give them act_granularity='per_token' or act_dtype=None through "
                         f"layer_policies, or skip them")
    warnings.warn(f"calibration never reached {what}: quantized without calibration statistics (RTN weights, no "
                  f"smoothing, no GPTQ)", RuntimeWarning)


def _unreached(st: _Stats, names: dict[str, PTQConfig]) -> set:
    """Targets that calibration never ran (an MoE expert no token was routed to). Static W8A8 cannot do
    without their input range: a ValueError names them. The others are quantized without statistics
    (RTN weights, no smoothing, no GPTQ), with a warning."""
    unseen = [n for n in names if n not in st.absmax]
    static = [n for n in unseen if names[n].mode == "W8A8"]
    if static:
        never_reached(f"{static[:8]}{' ...' if len(static) > 8 else ''}", static=True)
    if unseen:
        never_reached(f"{unseen[:8]}{' ...' if len(unseen) > 8 else ''}", static=False)
    return set(unseen)


# ============================================================================ smoothing decisions
@dataclass
class _Plan:
    """One group's smoothing: s [K] float32, and the norm 1/s may be folded into (None: smooth_scale)."""
    names: list
    s: torch.Tensor
    key: Optional[tuple] = None
    norm: Optional[nn.Module] = None
    offset: float = 0.0  # the norm scales by (offset + γ)


def _groups(st: _Stats, names: dict[str, PTQConfig]) -> list[list[str]]:
    groups = defaultdict(list)
    for full in names:
        groups[st.input_key.get(full, full)].append(full)
    return list(groups.values())


def _smooth_vector(st: _Stats, key, weights: list, biases: list, cfg: PTQConfig) -> torch.Tensor:
    """s [K] for the linears `weights` [N_i, K] (float, biases [N_i] or None) that read the input
    recorded under `key`: SmoothQuant's with cfg.smooth_alpha, or OSL's α search on the kept rows."""
    act = st.absmax[key]
    if cfg.outliers == "osl":
        return osl.search_alpha(st.xs[key].rows, weights, biases, act_granularity=cfg.act_granularity,
                                act_absmax=act, act_percentile=_percentile(cfg))[1]
    return smoothquant.smooth_scales(act, smoothquant.weight_absmax_per_in_channel(weights), cfg.smooth_alpha)


def _group_scale(st: _Stats, group: list[str], mods: list, cfg: PTQConfig) -> torch.Tensor:
    biases = [getattr(m, "bias", None) for m in mods]
    return _smooth_vector(st, group[0], [linear_weight(m).detach().float() for m in mods],
                          [b.detach().float() if b is not None else None for b in biases], cfg)


def _members_and_ancestors(group: list[str], prefix: str) -> set:
    """Relative names of the group's linears and of every module that contains one: the only
    readers of a norm's output that allow folding 1/s into that norm (a residual branch that reads
    it too, as in BERT's post-norm blocks, makes the fold wrong)."""
    out = set()
    for full in group:
        parts = _rel(full, prefix).split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def _plans(st: _Stats, targets: dict, unseen: set, prefix: str, shared: set) -> list[_Plan]:
    names = {n: c for n, (m, c) in targets.items()}
    plans = []
    for group in _groups(st, names):
        cfgs = [names[n] for n in group]
        wants = [c.outliers != "none" and c.act_dtype == "int8" for c in cfgs]
        _warn_mixed_group(group, cfgs, wants)
        if group[0] in unseen or not all(wants):
            continue
        s = _group_scale(st, group, [targets[n][0] for n in group], cfgs[0])
        plans.append(_Plan(group, s, st.input_key.get(group[0])))
    _attach_norms(st, plans, prefix, shared)
    return plans


def _warn_mixed_group(group: list[str], cfgs: list[PTQConfig], wants: list[bool]) -> None:
    """Linears that read one input share one smoothing vector, so their policies cannot differ there:
    say so when they do (smoothed only if every member asks for it, then as the first one asks)."""
    if any(wants) and not all(wants):
        warnings.warn(f"{group} read the same input and share one smoothing vector, but only some of their "
                      f"configs ask for smoothing (outliers != 'none' with act_dtype='int8'): none of them is "
                      f"smoothed; give them one policy", RuntimeWarning, stacklevel=4)
    elif all(wants) and len({(c.outliers, c.smooth_alpha, c.act_granularity, _percentile(c) if c.outliers == "osl"
                              else None) for c in cfgs}) > 1:
        warnings.warn(f"{group} read the same input and share one smoothing vector, but their configs differ in "
                      f"outliers / smooth_alpha / act_granularity / the percentile OSL scores with: {group[0]}'s "
                      f"decides it for all; give them one policy", RuntimeWarning, stacklevel=4)


def _attach_norms(st: _Stats, plans: list[_Plan], prefix: str, shared: set) -> None:
    """Give each plan the norm its 1/s may fold into: the norm produced the group's input, ran once in
    the block, shares no parameter, feeds only this group, and applies its weight in a known form."""
    by_norm = defaultdict(list)
    for p in plans:
        norm = st.producer.get(p.key)
        if (norm is None or st.norm_calls[norm] != 1
                or any(id(q) in shared for q in norm.parameters(recurse=False))
                or not st.readers[p.key] <= _members_and_ancestors(p.names, prefix)):
            continue
        by_norm[norm].append(p)
    for norm, ps in by_norm.items():
        offset = _norm_offset(norm, ps[0].key[2]) if len(ps) == 1 else None
        # (1 + γ) / s - 1 cancels: in bf16 / fp16 the fold moved a Gemma block's output by up to 2.4%
        # before any quantization (smooth_scale, which divides in float32, does not)
        if offset == 1.0 and norm.weight.dtype not in (torch.float32, torch.float64):
            offset = None
        if offset is not None:
            ps[0].norm, ps[0].offset = norm, offset


def _test_scale(k: int, device) -> torch.Tensor:
    """A fixed scale [K] of 1/2 and 2: folding it rounds nothing, so a valid fold changes no output."""
    g = torch.Generator().manual_seed(k)
    return (2.0 ** (2 * torch.randint(0, 2, (k,), generator=g) - 1)).to(device, torch.float32)


def _tol(t: torch.Tensor, exact: bool) -> float:
    """How far a fold may move an output: float noise only (exact: a test scale, which rounds nothing
    but a (1 + γ) norm's weight; else the real s, whose W·s and γ/s round once each)."""
    eps = torch.finfo(t.dtype).eps
    return max(1e-5, 4 * eps) if exact else max(1e-3, 8 * eps)


def _rel_err(got: Optional[torch.Tensor], want: Optional[torch.Tensor]) -> float:
    if got is None or want is None or got.shape != want.shape:
        return 0.0 if got is None and want is None else math.inf
    g, w = got.detach().float(), want.detach().float()
    err = float((g - w).norm() / w.norm().clamp_min(1e-30))
    return err if math.isfinite(err) else math.inf


def _same(got: list, want: list, exact: bool) -> bool:
    return all(_rel_err(g, w) <= (_tol(w, exact) if w is not None else 0.0) for g, w in zip(got, want))


def _fold(norm: nn.Module, s: torch.Tensor, offset: float) -> None:
    bias = getattr(norm, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    w, b = smoothquant.fold_into_norm(norm.weight.data, bias.data if bias is not None else None, s, offset)
    norm.weight.data = w
    if b is not None:
        norm.bias.data = b


def _restorer(norm: nn.Module):
    """A function that gives `norm` back the weight and bias it holds now (_fold replaces the tensors),
    on the device the norm is on when it runs (the layer may have gone back home since)."""
    bias = getattr(norm, "bias", None)
    w0, b0 = norm.weight.data, bias.data if isinstance(bias, torch.Tensor) else None

    def restore() -> None:
        norm.weight.data = w0.to(norm.weight.device)
        if b0 is not None:
            norm.bias.data = b0.to(norm.bias.device)
    return restore


@contextmanager
def _folded(norm: nn.Module, s: torch.Tensor, offset: float):
    """norm with 1/s folded in, restored on the way out."""
    restore = _restorer(norm)
    try:
        _fold(norm, s, offset)
        yield
    finally:
        restore()


@torch.no_grad()
def _norm_offset(norm: nn.Module, dtype: torch.dtype) -> Optional[float]:
    """How `norm` applies its weight γ: 0.0 for x̂·γ (+ β), 1.0 for x̂·(1 + γ) (+ β), None for neither
    (or a norm that cannot run on a plain [T, K] input): the form in which folding a test scale t
    gives norm(x) / t."""
    w = norm.weight
    k = w.shape[0]
    x = torch.randn(8, k, generator=torch.Generator().manual_seed(0)).to(w.device, dtype)
    t = _test_scale(k, w.device)
    try:
        out = norm(x)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            return None
        want = out.float() / t
        for offset in NORM_OFFSETS:
            with _folded(norm, t, offset):
                got = norm(x).float()
            if _rel_err(got, want) <= _tol(out, exact=True):
                return offset
    except (TypeError, ValueError, RuntimeError):  # not a plain norm: it is not folded into
        return None
    return None


def _smoothed_copy(mod: nn.Module, s: torch.Tensor) -> nn.Module:
    """A shallow copy of linear `mod` whose weight is a new tensor W · s (nn.Linear [N, K]; GPT-2's
    Conv1D stores [K, N]). The original Parameter, which may be tied to another module, is untouched."""
    w = mod.weight.detach()
    s = s.to(w.device, torch.float32)
    if isinstance(mod, nn.Linear):
        ws = smoothquant.scale_linear_weight(w, s)
    else:
        ws = smoothquant.scale_linear_weight(w.t(), s).t().contiguous()
    new = copy.copy(mod)
    new._parameters = {**mod._parameters, "weight": nn.Parameter(ws, requires_grad=False)}
    return new


def _rel(full: str, prefix: str) -> str:
    return full[len(prefix) + 1:] if prefix else full


def _outputs(block: nn.Module, call: tuple, rels: list[str], device) -> list:
    """[the block's hidden output, the first output of each module in rels] for one call."""
    got = {}

    def keep(name):
        def hook(_m, _args, out):  # returns None: the output goes on unchanged
            got.setdefault(name, out.detach() if isinstance(out, torch.Tensor) else None)
        return hook

    hooks = [block.get_submodule(r).register_forward_hook(keep(r)) for r in rels]
    try:
        out = block(*to_device(call[0], device), **to_device(call[1], device))
    finally:
        for h in hooks:
            h.remove()
    return [_hidden(out).detach()] + [got.get(r) for r in rels]


@contextmanager
def _swapped(block: nn.Module, rel: str, new: nn.Module):
    """block's submodule `rel` replaced by `new`, put back on the way out."""
    from .quantize import set_submodule

    old = block.get_submodule(rel)
    set_submodule(block, rel, new)
    try:
        yield
    finally:
        set_submodule(block, rel, old)


def _trial(block: nn.Module, prefix: str, plans: list[_Plan], call: tuple, rels: list[str], device,
           exact: bool) -> list:
    """_outputs with `plans` folded (into their norms, and smoothed copies of their linears swapped in),
    then put back. exact: fold the test scale instead of s."""
    with ExitStack() as stack:
        for p in plans:
            s = _test_scale(p.s.shape[0], p.norm.weight.device) if exact else p.s
            stack.enter_context(_folded(p.norm, s, p.offset))
            for n in p.names:
                rel = _rel(n, prefix)
                stack.enter_context(_swapped(block, rel, _smoothed_copy(block.get_submodule(rel), s)))
        return _outputs(block, call, rels, device)


def _call_size(call: tuple) -> int:
    args, kwargs = call
    return sum(t.numel() for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor))


def _verified_folds(block: nn.Module, prefix: str, names: list[str], plans: list[_Plan], calls, device) -> list:
    """The plans whose fold leaves the block's outputs (its hidden output and every target linear's)
    unchanged on the smallest calibration call: first each alone with the test scale, where a wrong
    fold (a residual that reads the norm's output, a norm whose form was misread) shows at once,
    then the survivors together with their real s, where a fold only rounds. Nothing stays changed."""
    cands = [p for p in plans if p.norm is not None]
    if not cands:
        return []
    call = min(calls, key=_call_size)
    rels = [_rel(n, prefix) for n in names]
    ref = _outputs(block, call, rels, device)
    good = [p for p in cands if _same(_trial(block, prefix, [p], call, rels, device, exact=True), ref, exact=True)]
    if good and not _same(_trial(block, prefix, good, call, rels, device, exact=False), ref, exact=False):
        return []
    return good


# ============================================================================ quantizing a block
def _quantized(full: str, mod: nn.Module, cfg: PTQConfig, st: _Stats, s: Optional[torch.Tensor],
               folded: bool) -> nn.Module:
    """The QuantLinear for target `full`, built from W·s (a copy) when smoothed; the module is not changed."""
    src = _smoothed_copy(mod, s) if s is not None else mod
    absmax = st.absmax.get(full)
    if absmax is not None:
        absmax = static_absmax(st, full, absmax, s, cfg)
    qweight = None
    if cfg.precision_recovery == "gptq" and full in st.hessian:
        qweight = _gptq(linear_weight(src).detach().float(), st.hessian[full], s, cfg)
    q = QuantLinear.from_float(src, cfg, name=full, input_absmax=absmax, qweight=qweight)
    if s is not None and not folded:
        q.smooth_scale = s.to(q.weight.device, torch.float32).clone()
    return q


def static_absmax(st: _Stats, key, channel_absmax: torch.Tensor, s: Optional[torch.Tensor],
                  cfg: PTQConfig) -> torch.Tensor:
    """The range a static scale is set from for target `key`'s input x / s (s None: not smoothed): its max,
    max_j(channel_absmax_j / s_j), or under act_observer="percentile" (below 1) the act_percentile quantile
    of |x / s| over the rows kept of it (RowSample), the max where that quantile is 0 (a sparse input)."""
    top = (channel_absmax if s is None else channel_absmax / s.to(channel_absmax.device)).amax()
    q = _percentile(cfg)
    if q is None or key not in st.xs:
        return top
    x = st.xs[key].rows
    return static_range(x if s is None else x / s.to(x.device, torch.float32), q, top)


def _gptq(w: torch.Tensor, H: torch.Tensor, s: Optional[torch.Tensor], cfg: PTQConfig) -> tuple:
    """GPTQ of the float weight w [N, K] (W·s when smoothed) given the Hessian H of its unsmoothed input."""
    if s is not None:  # the Hessian of the smoothed input x / s
        sd = s.to(H.device, H.dtype)
        H = H / (sd[:, None] * sd[None, :])
    g = cfg.weight_group
    return gptq.gptq_quantize(w, H, group_size=g, act_order=cfg.gptq_act_order)


@torch.no_grad()
def quantize_block(block: nn.Module, prefix: str, targets: dict[str, tuple[nn.Module, PTQConfig]],
                   calls: list, device, quiet: bool, shared: frozenset = frozenset(),
                   masks: Optional[list] = None, undo: Optional[list] = None,
                   experts: Optional[dict] = None) -> None:
    """Observe, smooth, calibrate and quantize every target inside `block` (names are model-global), and
    the fused experts modules `experts` ({name: (module, config)}) in it, per expert (layerwise_experts).
    shared: ids of parameters the model reaches under several names (never folded into); masks: the
    calls' real tokens (`_token_mask`; padding is left out of the statistics); undo: a list that gets,
    for every norm folded into and every experts module quantized, a function putting it back
    (quantize() runs them on failure).

    Every decision is made and every QuantLinear and QuantExperts built before the block changes, so an
    error leaves the block as it was; then the verified folds are written into their norms, the linears
    swapped and the experts attached."""
    from .integrations import hf_experts
    from .layerwise_experts import expert_rounds, quantized_experts
    from .quantize import set_submodule

    experts = experts or {}
    names = {n: c for n, (m, c) in targets.items()}
    rounds = expert_rounds(experts)
    st = _observe(block, prefix, names, calls, device, quiet, masks, experts, hessian_experts=rounds[0])
    unseen = _unreached(st, names)
    plans = _plans(st, targets, unseen, prefix, shared)
    folds = _verified_folds(block, prefix, list(names), plans, calls, device)
    folded = {n for p in folds for n in p.names}
    scale = {n: p.s for p in plans for n in p.names}
    built = {full: _quantized(full, mod, cfg, st, scale.get(full), full in folded)
             for full, (mod, cfg) in targets.items()}
    built_experts = quantized_experts(block, prefix, experts, st, calls, device, quiet, masks, rounds)
    for p in folds:
        if undo is not None:
            undo.append(_restorer(p.norm))
        _fold(p.norm, p.s, p.offset)
    for full, q in built.items():
        set_submodule(block, _rel(full, prefix), q)
    for full, q in built_experts.items():
        mod = experts[full][0]
        old = hf_experts.attach(mod, q)
        if undo is not None:
            undo.append(lambda mod=mod, old=old: hf_experts.detach(mod, old))


# ============================================================================ the driver
def _run_layer(layer: nn.Module, prefix: str, mine: dict, calls: list, device, quiet: bool, shared: set,
               want_outputs: bool, masks: Optional[list] = None, undo: Optional[list] = None,
               experts: Optional[dict] = None) -> list:
    """Quantize one layer's targets (and fused experts) on `device` and return its (quantized) hidden
    outputs for `calls`. The layer, and the float linears and expert weights it had, go back to where
    they were whatever happens."""
    from .calibrate import model_device

    home = model_device(layer)
    dev = torch.device(device) if device is not None else home
    floats = [m for m, _ in mine.values()]
    expert_params = [t for m, _ in (experts or {}).values() for t in m._parameters.values() if t is not None]
    try:
        layer.to(dev)
        if mine or experts:
            quantize_block(layer, prefix, mine, calls, dev, quiet, shared, masks, undo, experts)
        if not want_outputs:
            return []
        return [_hidden(layer(*to_device(a, dev), **to_device(k, dev))) for a, k in calls]
    finally:
        layer.to(home)
        for m in floats:  # the float modules QuantLinears replaced went to dev with the layer
            m.to(home)
        for t in expert_params:  # and the float expert weights a QuantExperts replaced
            t.data = t.data.to(home)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def calibrate_and_quantize(model: nn.Module, targets: dict[str, tuple[nn.Module, PTQConfig]], calib_data,
                           quiet: bool = False, device=None, undo: Optional[list] = None,
                           experts: Optional[dict] = None) -> None:
    """Quantize every target with calibration, one decoder layer at a time where the model has them, and
    the fused experts modules `experts` ({name: (module, config)}) with their layer, per expert.
    An error part way leaves the layers before it quantized: quantize() puts back the float linears
    (which `targets` holds) and runs `undo`, which gets a restoring function for every norm folded into
    and every experts module quantized."""
    from tqdm.auto import tqdm

    from .calibrate import model_device

    if device is not None and torch.device(device).type == "meta":
        raise ValueError("device='meta' holds no data: calibration runs each layer on a real device")
    if isinstance(calib_data, torch.Tensor) or hasattr(calib_data, "keys"):
        calib_data = [calib_data]
    calib_data = list(calib_data)
    if not calib_data:
        raise ValueError("calib_data is empty: calibration needs at least one sample")
    experts = experts or {}
    shared = _shared_params(model)
    stack = decoder_layers(model, list(targets) + list(experts))
    done = set()
    if stack is not None:
        lname, layers = stack
        reached: list = []
        per_layer = capture_layer_calls(model, lname, layers, calib_data, quiet, reached)
        masks = [_token_mask(calib_data[j]) for j in reached]
        beyond = [n for n in list(targets) + list(experts)
                  if any(n.startswith(f"{lname}.{i}.") for i in range(len(per_layer), len(layers)))]
        if beyond:
            raise ValueError(f"calibration never reached {lname}.{len(per_layer)}, which holds {beyond[:4]}: "
                             f"the model's forward stopped before it")
        calls = per_layer[0]
        for i, layer in enumerate(tqdm(layers[:len(per_layer)], desc="quantizing layers", unit="layer", disable=quiet)):
            prefix = f"{lname}.{i}"
            mine = {n: t for n, t in targets.items() if n.startswith(prefix + ".")}
            mine_experts = {n: t for n, t in experts.items() if n.startswith(prefix + ".")}
            last = i + 1 == len(per_layer)
            hidden = _run_layer(layer, prefix, mine, calls, device, quiet, shared, want_outputs=not last, masks=masks,
                                undo=undo, experts=mine_experts)
            done.update(mine)
            done.update(mine_experts)
            if not last:  # the next layer reads this (quantized) layer's outputs, with its own kwargs
                calls = [_with_hidden(c, h) for c, h in zip(per_layer[i + 1], hidden)]
                per_layer[i] = None
    rest = {n: t for n, t in targets.items() if n not in done}
    rest_experts = {n: t for n, t in experts.items() if n not in done}
    if rest or rest_experts:
        home = model_device(model)
        quantize_block(model, "", rest, [_as_call(s) for s in calib_data], home, quiet, shared,
                       [_token_mask(s) for s in calib_data], undo, rest_experts)
