"""int8 fused MoE experts in transformers (5.x) models: the experts forward that runs a QuantExperts.

transformers' experts modules (``use_experts_implementation``) dispatch their forward by name through
its experts interface (``config._experts_implementation``). ptqrt registers ``ptqrt_int8`` there;
``attach`` replaces an experts module's 3-D float projections by a QuantExperts child and points the
module's config at it. An experts module that shares that config but holds no QuantExperts (skipped)
runs its own eager forward. Llama-4's experts module (``modules.experts.dense``) has no such interface:
``attach`` gives the module itself the forward ``int8_dense_forward``.

Per call: the (token, expert) pairs are sorted by expert; each expert with tokens runs its first
projection (gate_up or up) on its rows, the gate or activation as the module defines it, its down
projection, then the optional post-expert norm; the rows are weighted by the router and summed per
token in float32, as transformers' batched forward does. Expert ids past the module's experts (expert
parallel sentinels) contribute nothing.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.experts import QuantExperts, dense, expert_bias, expert_weights, fused_projections

try:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
except ImportError as e:  # pragma: no cover - exercised only without transformers >= 5
    raise ImportError(f"ptqrt.integrations.hf_experts needs transformers>=5 with fused experts ({e})") from e

IMPL = "ptqrt_int8"
CHILD = "ptqrt_experts"


def run_experts(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                num_experts: int, shapes: dict, linear: Callable, seen: Optional[Callable] = None) -> torch.Tensor:
    """The experts module `self`'s forward with `linear(proj, e, x)` [M, K] -> [M, N] as expert e's
    projection proj, `shapes` {proj: (N, K)} (biases, gate, activation and post norm are the module's).
    seen(proj, e, x, tokens), if given, gets each projection's input rows and their token indices into
    hidden_states first."""
    first = "gate_up_proj" if "gate_up_proj" in shapes else "up_proj"
    t, k = top_k_index.shape
    ids = top_k_index.reshape(-1)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num_experts).tolist()
    token = order // k
    x = hidden_states[token]
    out = torch.zeros(ids.numel(), shapes["down_proj"][0], dtype=hidden_states.dtype, device=hidden_states.device)
    start = 0
    for e, c in enumerate(counts[:num_experts]):
        if c:
            rows = slice(start, start + c)
            h = x[rows]
            for proj in (first, "down_proj"):
                if proj == "down_proj":
                    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
                    h = h.to(hidden_states.dtype)
                if seen is not None:
                    seen(proj, e, h, token[rows])
                h = linear(proj, e, h)
                b = expert_bias(self, proj)
                if b is not None:
                    h = h + b[e]
            if getattr(self, "has_post_expert_norm", False):
                h = self.post_expert_norm(h)
            out[rows] = h.to(out.dtype)
        start += c
    weighted = out.float() * top_k_weights.reshape(-1)[order].float()[:, None]
    final = torch.zeros(t, out.shape[1], dtype=torch.float32, device=out.device).index_add_(0, token, weighted)
    return final.to(hidden_states.dtype)


def int8_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    q = getattr(self, CHILD, None)
    if not isinstance(q, QuantExperts):  # an experts module left float that shares the config
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)
    return run_experts(self, hidden_states, top_k_index, top_k_weights, q.num_experts, q.shapes, q.linear)


def observed_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor, *, seen: Callable) -> torch.Tensor:
    """The float forward of experts module `self` (its own weights, in run_experts' order of operations)
    that hands each expert projection's input to `seen(proj, e, x, tokens)`: what calibration observes."""
    weights = expert_weights(self)
    shapes = {p: tuple(w.shape[1:]) for p, w in weights.items()}
    return run_experts(self, hidden_states, top_k_index, top_k_weights, weights["down_proj"].shape[0], shapes,
                       lambda p, i, x: F.linear(x, weights[p][i]), seen)


def run_dense_experts(self: nn.Module, hidden_states: torch.Tensor, num_experts: int, out_features: int,
                      linear: Callable, seen: Optional[Callable] = None) -> torch.Tensor:
    """Llama-4's experts forward (``modules.experts.dense``) with `linear(proj, e, x)` as expert e's
    projection: hidden_states [E * T, K] holds each expert's input for all T tokens, the router's weight
    already multiplied in, so a row of zeros is a token not routed to that expert. Only the other rows
    run: a row of zeros gives zeros through gate_up_proj, the gate and down_proj (they have no bias), so
    the result is the module's own. seen(proj, e, x, tokens), if given, gets each projection's input
    rows and their token indices (0 .. T - 1) first."""
    x = hidden_states.reshape(num_experts, -1, hidden_states.shape[-1])
    routed = (x != 0).any(dim=-1)  # [E, T]
    pairs = routed.nonzero()  # (expert, token), expert by expert
    counts = routed.sum(dim=1).tolist()
    out = torch.zeros(num_experts, x.shape[1], out_features, dtype=hidden_states.dtype, device=x.device)
    start = 0
    for e, c in enumerate(counts):
        if not c:
            continue
        tokens = pairs[start:start + c, 1]
        start += c
        h = x[e, tokens]
        if seen is not None:
            seen("gate_up_proj", e, h, tokens)
        gate, up = linear("gate_up_proj", e, h).chunk(2, dim=-1)
        h = (up * self.act_fn(gate)).to(hidden_states.dtype)
        if seen is not None:
            seen("down_proj", e, h, tokens)
        out[e, tokens] = linear("down_proj", e, h).to(out.dtype)
    return out.reshape(-1, out.shape[-1])


def int8_dense_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The forward attach() gives Llama-4's experts module: its QuantExperts on the routed rows."""
    q = getattr(self, CHILD, None)
    if not isinstance(q, QuantExperts):
        return type(self).forward(self, hidden_states)
    return run_dense_experts(self, hidden_states, q.num_experts, q.shapes["down_proj"][0], q.linear)


def observed_dense_forward(self: nn.Module, hidden_states: torch.Tensor, *, seen: Callable) -> torch.Tensor:
    """observed_forward for Llama-4's experts module (run_dense_experts on its float weights)."""
    weights = expert_weights(self)
    return run_dense_experts(self, hidden_states, weights["down_proj"].shape[0], weights["down_proj"].shape[1],
                             lambda p, i, x: F.linear(x, weights[p][i]), seen)


if IMPL not in ALL_EXPERTS_FUNCTIONS._global_mapping:
    ALL_EXPERTS_FUNCTIONS.register(IMPL, int8_experts_forward)


def attach(module: nn.Module, q: QuantExperts) -> dict:
    """Give experts `module` the QuantExperts `q` in place of its float projections and make it run
    int8_experts_forward (through its config) or, for Llama-4's, int8_dense_forward (its own forward).
    Returns what it replaced, for detach()."""
    projections = fused_projections(module)
    if sorted(projections) != sorted(q.shapes):
        raise ValueError(f"attach: {type(module).__name__} holds {projections}; the QuantExperts has {list(q.shapes)}")
    old = {"params": {p: module._parameters[p] for p in projections}}
    if dense(module):
        old["forward"] = module.__dict__.get("forward")
        old["hooked"] = module.__dict__.get("_old_forward")
    else:
        old["impl"] = module.config._experts_implementation_internal
    for p in projections:
        del module._parameters[p]
    module.add_module(CHILD, q)
    rewire(module)
    return old


def detach(module: nn.Module, old: dict) -> None:
    """Undo attach(module, ...) with what it returned."""
    module._modules.pop(CHILD, None)
    for p, t in old["params"].items():
        module._parameters[p] = t
    if "forward" in old:
        for key in ("forward", "_old_forward"):
            module.__dict__.pop(key, None)
        if old["forward"] is not None:
            module.forward = old["forward"]
        if old["hooked"] is not None:
            module._old_forward = old["hooked"]
    else:
        module.config._experts_implementation_internal = old["impl"]


def rewire(module: nn.Module) -> None:
    """Make an experts module that holds a QuantExperts run it: its config pointed at int8_experts_forward,
    or, for Llama-4's, int8_dense_forward as its own forward."""
    if dense(module):
        forward = functools.partial(int8_dense_forward, module)  # pickles, unlike a bound method
        if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__:
            module._old_forward = forward  # accelerate's hook runs _old_forward between its own steps
        else:
            module.forward = forward
    else:
        module.config._experts_implementation_internal = IMPL


__all__ = ["IMPL", "CHILD", "run_experts", "int8_experts_forward", "observed_forward", "run_dense_experts",
           "int8_dense_forward", "observed_dense_forward", "attach", "detach", "rewire"]
