"""Calibration of fused MoE experts, expert by expert (the layer-by-layer driver is ptqrt.layerwise).

transformers' experts modules hold every expert's weights as one 3-D tensor a projection, so there is no
nn.Linear to hook. While a block is observed, each experts module runs its float forward in ptqrt's order
of operations (hf_experts.observed_forward), which hands over each expert projection's input rows; they are
recorded under (module name, projection, expert) in the block's statistics, padding left out. From them
every expert gets its own smoothing vector (SmoothQuant or OSL, fused into the activation quantization:
the norm in front feeds the router and every expert), static input scale and GPTQ Hessian.
"""
from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from .config import PTQConfig
from .integrations import hf_experts
from .layerwise import (_gptq, _record, _rel, _smooth_vector, _Stats, never_reached, restore_forwards,
                        static_absmax)
from .modules.experts import QuantExperts, dense, expert_bias, expert_weights
from .reference import quantize_weight


@contextmanager
def observing(block: nn.Module, prefix: str, experts: dict, st: _Stats, cur: dict):
    """The experts modules `experts` ({name: (module, config)}) of `block` run their float forward through
    hf_experts.observed_forward, which records each expert projection's input rows (padding left out)
    under (name, projection, expert); their own forward is back on the way out."""
    mods, saved = [], []
    try:
        for full, (_, cfg) in experts.items():
            mod = block.get_submodule(_rel(full, prefix))

            def seen(proj, e, x, tokens, full=full, cfg=cfg):
                real = cur["real"]  # the call's token mask, flattened, on the device (None: every token)
                if real is not None and tokens.numel():
                    x = x[real[tokens]]
                if x.shape[0]:
                    _record(st, (full, proj, e), x.detach(), cfg)

            def forward(*args, mod=mod, seen=seen, sig=inspect.signature(type(mod).forward), **kwargs):
                bound = list(sig.bind(mod, *args, **kwargs).arguments.values())[1:4]
                hidden_states = bound[0]
                tokens = hidden_states.shape[0] // (expert_weights(mod)["down_proj"].shape[0] if dense(mod) else 1)
                mask = cur["mask"]
                cur["real"] = mask.reshape(-1).to(hidden_states.device) if (
                    mask is not None and mask.numel() == tokens) else None
                if dense(mod):  # Llama-4's: each expert's input for every token, [E * T, K]
                    return hf_experts.observed_dense_forward(mod, hidden_states, seen=seen)
                return hf_experts.observed_forward(mod, *bound, seen=seen)
            saved.append(mod.__dict__.get("forward"))
            mods.append(mod)
            mod.forward = forward
        yield
    finally:
        restore_forwards(mods, saved)


def quantized(full: str, mod: nn.Module, cfg: PTQConfig, st: _Stats) -> nn.Module:
    """The QuantExperts for experts module `full` (not changed), each expert calibrated on the rows routed
    to it: its own smoothing vector per projection (SmoothQuant or OSL), its static input scale (W8A8),
    GPTQ from its own Hessian. An expert no calibration token reached takes RTN weights and no smoothing
    and, under static W8A8, a scale from the largest input range the module's reached experts saw for
    that projection before smoothing (its input is not smoothed; under act_observer="percentile", the
    largest of their quantiles), with a warning. A module that
    calibration never ran is an error under static W8A8 (there is no range to take), RTN with a warning
    otherwise."""
    weights = expert_weights(mod)
    n_exp = weights["down_proj"].shape[0]
    g = cfg.weight_group
    reached = {p: [e for e in range(n_exp) if (full, p, e) in st.absmax] for p in weights}
    if not any(reached.values()):
        never_reached(f"the experts {full!r}", static=cfg.mode == "W8A8")
        return QuantExperts.from_float(mod, cfg.mode, g)
    unseen = sorted({e for p in weights for e in range(n_exp) if e not in reached[p]})
    if unseen:
        warnings.warn(f"calibration reached {n_exp - len(unseen)} of the {n_exp} experts of {full!r}; experts "
                      f"{unseen[:8]}{' ...' if len(unseen) > 8 else ''} take RTN weights and no smoothing"
                      + (", and a static scale from the largest input range the reached experts saw (before any "
                         "smoothing)" if cfg.mode == "W8A8" else "")
                      + ": more calibration tokens would route some to them", RuntimeWarning)
    smoothing = cfg.outliers != "none" and cfg.act_dtype == "int8"
    smooth, absmax, qweights = {}, {}, {}
    for p, w in weights.items():
        k = w.shape[2]
        bias = expert_bias(mod, p)
        s = torch.ones(n_exp, k)
        amax = torch.zeros(n_exp)
        for e in reached[p]:
            if smoothing:
                b = None if bias is None else bias[e].detach().float()
                s[e] = _smooth_vector(st, (full, p, e), [w[e].float()], [b], cfg).cpu()
            amax[e] = static_absmax(st, (full, p, e), st.absmax[(full, p, e)], s[e] if smoothing else None, cfg)
        others = [e for e in range(n_exp) if e not in reached[p]]
        if others:
            amax[others] = max(static_absmax(st, (full, p, e), st.absmax[(full, p, e)], None, cfg) for e in reached[p])
        if cfg.precision_recovery == "gptq":
            rows = []
            for e in range(n_exp):
                we = w[e].float() * s[e].to(w.device) if smoothing else w[e].float()
                key = (full, p, e)
                rows.append(_gptq(we, st.hessian[key], s[e] if smoothing else None, cfg) if key in st.hessian
                            else quantize_weight(we, g))
            qweights[p] = (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
        smooth[p], absmax[p] = s, amax
    return QuantExperts.from_float(mod, cfg.mode, g, smooth=smooth if smoothing else None,
                                   input_absmax=absmax if cfg.mode == "W8A8" else None, qweights=qweights or None)
