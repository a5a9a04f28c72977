"""Calibration one block at a time: SmoothQuant / OSL smoothing, static scales and GPTQ.

For a decoder model the blocks are its layers: the inputs of the first layer are captured once, then
each layer is moved to the compute device, observed in float, quantized, and run again quantized to
make the next layer's inputs — so one layer and its activations are on the device at a time (the
rest stays where it is, e.g. on the CPU). Linears outside the layers (a pooler, an unskipped lm_head)
are done afterwards with the whole model as the block. A model without a layer stack is one block.

Within a block, linears that read the same input tensor form a group (q/k/v, gate/up): they share
one smoothing vector s. When that input is the output of a LayerNorm/RMSNorm read by nothing else,
1/s is folded into the norm; otherwise QuantLinear divides its input by s inside the quantize op.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from torch import nn

from .algorithms import gptq, osl, smoothquant
from .calibrate import run_sample, to_device
from .config import PTQConfig
from .modules.linear import QuantLinear, linear_weight
from .observers import MinMaxObserver

OSL_MAX_TOKENS = 2048  # calibration tokens kept per group for the α search


class _Captured(Exception):
    pass


def decoder_layers(model: nn.Module, targets) -> Optional[tuple[str, nn.ModuleList]]:
    """The longest ModuleList of same-class blocks that hold target linears (model.layers, h, layer...)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(m) for m in mod}) == 1:
            if any(t.startswith(f"{name}.") for t in targets) and (best is None or len(mod) > len(best[1])):
                best = (name, mod)
    return best


def _as_call(sample) -> tuple[tuple, dict]:
    from collections.abc import Mapping
    if isinstance(sample, Mapping):
        return (), dict(sample)
    if isinstance(sample, (tuple, list)):
        return tuple(sample), {}
    return (sample,), {}


def _drop_caches(kwargs: dict) -> dict:
    """Calibration never fills a KV cache: layers get past_key_values=None and use_cache=False."""
    out = dict(kwargs)
    for k in ("past_key_value", "past_key_values", "layer_past"):
        if k in out:
            out[k] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


@torch.no_grad()
def capture_inputs(model: nn.Module, layer: nn.Module, calib_data, quiet: bool) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of `layer`'s forward for each calibration sample; stops each run there."""
    from tqdm.auto import tqdm

    from .calibrate import model_device

    captured = []

    def hook(_m, args, kwargs):
        captured.append((args, _drop_caches(kwargs)))
        raise _Captured

    h = layer.register_forward_pre_hook(hook, with_kwargs=True)
    device = model_device(model)
    try:
        for sample in tqdm(calib_data, desc="capturing layer inputs", unit="sample", disable=quiet, leave=False):
            try:
                run_sample(model, to_device(sample, device))
            except _Captured:
                pass
    finally:
        h.remove()
    return captured


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_hidden(call: tuple[tuple, dict], hidden: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return args, {**kwargs, key: hidden}


class _Stats:
    """What the float pass over a block records per target linear and per input tensor."""

    def __init__(self):
        self.observers: dict[str, MinMaxObserver] = defaultdict(MinMaxObserver)
        self.absmax: dict[str, torch.Tensor] = {}  # per input channel, filled from the observers
        self.hessian: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = defaultdict(int)
        self.xs: dict[str, list] = defaultdict(list)
        self.input_key: dict[str, tuple] = {}        # linear -> identity of its input tensor (first sample)
        self.producer: dict[tuple, str] = {}         # tensor identity -> norm module that produced it
        self.readers: dict[tuple, set] = defaultdict(set)  # tensor identity -> every module that read it
        # Identities are storage addresses: the first pass holds every tensor it keyed, so that no
        # freed activation's address is reused by another tensor and mistaken for it.
        self.alive: list = []


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.dtype)


def _observe(block: nn.Module, prefix: str, names: dict[str, PTQConfig], calls, device, quiet: bool) -> _Stats:
    from tqdm.auto import tqdm

    st = _Stats()
    handles = []
    first = [True]
    by_module = {}
    for full in names:
        rel = full[len(prefix) + 1:] if prefix else full
        by_module[block.get_submodule(rel)] = full

    rel_name = {mod: n for n, mod in block.named_modules()}

    def pre(mod, args, kwargs):
        if first[0]:  # who reads which tensor decides whether 1/s may be folded into a norm
            for t in list(args) + list(kwargs.values()):
                if isinstance(t, torch.Tensor):
                    st.readers[_key(t)].add(rel_name[mod])
                    st.alive.append(t)
        full = by_module.get(mod)
        if full is None:
            return
        x = args[0] if args else next(iter(kwargs.values()))
        cfg = names[full]
        x2 = x.detach().reshape(-1, x.shape[-1])
        if first[0]:
            st.input_key[full] = _key(x)
        st.observers[full].update(x2)
        if cfg.precision_recovery == "gptq":
            st.hessian[full], st.tokens[full] = gptq.accumulate_hessian(st.hessian.get(full), x2, st.tokens[full])
        if cfg.outliers == "osl":
            have = sum(t.shape[0] for t in st.xs[full])
            if have < OSL_MAX_TOKENS:
                st.xs[full].append(x2[: OSL_MAX_TOKENS - have].float().cpu())

    def post(mod, _args, out):
        if first[0] and isinstance(out, torch.Tensor) and _is_norm(mod):
            st.producer[_key(out)] = mod
            st.alive.append(out)

    for mod in block.modules():
        if mod is block:
            continue
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        if _is_norm(mod):
            handles.append(mod.register_forward_hook(post))
    try:
        for args, kwargs in tqdm(calls, desc="observing", unit="sample", disable=quiet, leave=False):
            block(*to_device(args, device), **to_device(kwargs, device))
            first[0] = False
    finally:
        for h in handles:
            h.remove()
        st.alive.clear()
    st.absmax = {n: o.channel_absmax for n, o in st.observers.items() if o.channel_absmax is not None}
    return st


def _is_norm(mod: nn.Module) -> bool:
    cls = type(mod).__name__
    w = getattr(mod, "weight", None)
    # Gemma-style norms scale by (1 + w); folding 1/s there needs another formula, so they are left alone.
    return (cls.endswith(("LayerNorm", "RMSNorm")) and not cls.startswith("Gemma")
            and isinstance(w, torch.Tensor) and w.dim() == 1)


def _groups(st: _Stats, names: dict[str, PTQConfig]) -> list[list[str]]:
    groups = defaultdict(list)
    for full in names:
        groups[st.input_key.get(full, full)].append(full)
    return list(groups.values())


def _members_and_ancestors(group: list[str], prefix: str) -> set:
    """Relative names of the group's linears and of every module that contains one: the only
    readers of a norm's output that allow folding 1/s into that norm (a residual branch that reads
    it too, as in BERT's post-norm blocks, makes the fold wrong)."""
    out = set()
    for full in group:
        rel = full[len(prefix) + 1:] if prefix else full
        parts = rel.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def _scale_in_channels(mod: nn.Module, s: torch.Tensor) -> None:
    """W <- W · s in place (nn.Linear [N, K]; GPT-2 Conv1D stores [K, N])."""
    w = mod.weight
    s = s.to(w.device, torch.float32)
    if isinstance(mod, nn.Linear):
        w.data = smoothquant.scale_linear_weight(w.data, s)
    else:
        w.data = smoothquant.scale_linear_weight(w.data.t(), s).t().contiguous()


@torch.no_grad()
def quantize_block(block: nn.Module, prefix: str, targets: dict[str, tuple[nn.Module, PTQConfig]],
                   calls: list, device, quiet: bool) -> None:
    """Observe, smooth, calibrate and quantize every target inside `block` (names are model-global)."""
    from .quantize import set_submodule

    names = {n: c for n, (m, c) in targets.items()}
    st = _observe(block, prefix, names, calls, device, quiet)
    smooth, folded = {}, set()
    for group in _groups(st, names):
        cfgs = [names[n] for n in group]
        if not all(c.outliers != "none" and c.act_dtype == "int8" for c in cfgs):
            continue
        mods = [targets[n][0] for n in group]
        weights = [linear_weight(m).detach().float() for m in mods]
        act = st.absmax[group[0]]
        if cfgs[0].outliers == "osl":
            x = torch.cat(st.xs[group[0]])
            biases = [getattr(m, "bias", None) for m in mods]
            _, s = osl.search_alpha(x, weights, [b.detach().float() if b is not None else None for b in biases],
                                    act_granularity=cfgs[0].act_granularity)
        else:
            s = smoothquant.smooth_scales(act, smoothquant.weight_absmax_per_in_channel(weights), cfgs[0].smooth_alpha)
        key = st.input_key.get(group[0])
        norm = st.producer.get(key)
        if norm is not None and st.readers[key] <= _members_and_ancestors(group, prefix):
            w, b = smoothquant.fold_into_norm(norm.weight.data, getattr(norm, "bias", None), s)
            norm.weight.data = w
            if b is not None:
                norm.bias.data = b
            folded.update(group)
        for n, m in zip(group, mods):
            _scale_in_channels(m, s)
            smooth[n] = s
    for full, (mod, cfg) in targets.items():
        s = smooth.get(full)
        absmax = st.absmax.get(full)
        if absmax is not None and s is not None:
            absmax = absmax / s.to(absmax.device)
        qweight = None
        if cfg.precision_recovery == "gptq":
            H = st.hessian[full]
            if s is not None:  # the Hessian of the smoothed input x / s
                sd = s.to(H.device, H.dtype)
                H = H / (sd[:, None] * sd[None, :])
            g = cfg.group_size if cfg.weight_granularity == "per_group" else 0
            qweight = gptq.gptq_quantize(linear_weight(mod).detach().float(), H, group_size=g,
                                         act_order=cfg.gptq_act_order)
        q = QuantLinear.from_float(mod, cfg, name=full, input_absmax=absmax.amax() if absmax is not None else None,
                                   qweight=qweight)
        if s is not None and full not in folded:
            q.smooth_scale = s.to(q.weight.device, torch.float32).clone()
        rel = full[len(prefix) + 1:] if prefix else full
        set_submodule(block, rel, q)


def calibrate_and_quantize(model: nn.Module, targets: dict[str, tuple[nn.Module, PTQConfig]], calib_data,
                           quiet: bool = False, device=None) -> None:
    """Quantize every target with calibration, one decoder layer at a time where the model has them."""
    from tqdm.auto import tqdm

    from .calibrate import model_device

    if isinstance(calib_data, torch.Tensor) or hasattr(calib_data, "keys"):
        calib_data = [calib_data]
    calib_data = list(calib_data)
    if not calib_data:
        raise ValueError("calib_data is empty: calibration needs at least one sample")
    stack = decoder_layers(model, targets)
    done = set()
    if stack is not None:
        lname, layers = stack
        calls = capture_inputs(model, layers[0], calib_data, quiet)
        if not calls:
            raise ValueError(f"calibration never reached {lname}.0: check calib_data")
        for i, layer in enumerate(tqdm(layers, desc="quantizing layers", unit="layer", disable=quiet)):
            prefix = f"{lname}.{i}"
            mine = {n: t for n, t in targets.items() if n.startswith(prefix + ".")}
            home = model_device(layer)
            dev = torch.device(device) if device is not None else home
            layer.to(dev)
            if mine:
                quantize_block(layer, prefix, mine, calls, dev, quiet)
                done.update(mine)
            if i + 1 < len(layers):  # the next layer reads this (quantized) layer's outputs
                calls = [_with_hidden(c, _hidden(layer(*to_device(c[0], dev), **to_device(c[1], dev))))
                         for c in calls]
            layer.to(home)
            for n in mine:  # the float modules QuantLinears replaced went to dev with the layer
                targets[n][0].to(home)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    rest = {n: t for n, t in targets.items() if n not in done}
    if rest:
        home = model_device(model)
        quantize_block(model, "", rest, [_as_call(s) for s in calib_data], home, quiet)
