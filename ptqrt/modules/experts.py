"""QuantExperts: int8 weights of fused MoE experts (transformers' experts modules, which hold every
expert's weights as one 3-D tensor per projection instead of an nn.Linear each).

It is attached as the child ``ptqrt_experts`` of the experts module, whose float 3-D parameters it
replaces; the experts forward that reads it is ``ptqrt.integrations.hf_experts``. Buffers, per
projection P (gate_up_proj or up_proj, and down_proj), all persistent:
  P          int8 [E, N, K]                         each expert's RTN weights, [out, in] whatever the
                                                    module's layout ([E, K, N] when transposed)
  P_scale    float32 [E, N] or [E, N, K // g]       per channel or per group (W8A16 only)
Modes: W8A16 (float activations, dequant fused in the GEMM) and W8A8_DYNAMIC (per-token int8
activations). Static activation scales, smoothing and GPTQ need per-expert calibration, which is not
done for fused experts: quantize() gives them the dynamic (or W8A16) form and says so.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import _checks, ops
from ..reference import quantize_weight
from .scales import keep_float32

MODES = ("W8A16", "W8A8_DYNAMIC")
PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")  # the 3-D parameters transformers' experts hold


def fused_projections(module: nn.Module) -> list[str]:
    """The 3-D float projection parameters of a transformers experts module that dispatches through
    its experts interface (``use_experts_implementation``); [] for any other module."""
    if not hasattr(module, "has_gate") or not hasattr(module, "is_transposed"):
        return []
    found = [p for p in PROJECTIONS if isinstance(module._parameters.get(p), torch.Tensor)
             and module._parameters[p].dim() == 3 and module._parameters[p].is_floating_point()]
    return found if "down_proj" in found and len(found) == 2 else []


class QuantExperts(nn.Module):
    """int8 weights of E experts for each projection; ``linear(p, e, x)`` runs expert e's projection p."""

    def __init__(self, projections: dict, num_experts: int, mode: str = "W8A16", group_size: int = 0,
                 device=None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"QuantExperts: mode must be one of {MODES}; got {mode!r}")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
            raise ValueError(f"QuantExperts: num_experts must be a positive int; got {num_experts!r}")
        if not projections or any(p not in PROJECTIONS for p in projections):
            raise ValueError(f"QuantExperts: projections must be some of {PROJECTIONS}; got {list(projections)}")
        self.mode, self.group_size, self.num_experts = mode, group_size, num_experts
        self.shapes = {p: (int(n), int(k)) for p, (n, k) in projections.items()}
        for p, (n, k) in self.shapes.items():
            if n <= 0 or k <= 0:
                raise ValueError(f"QuantExperts: {p} must be [N, K] with N, K > 0; got {[n, k]}")
            if group_size and (mode != "W8A16" or k % group_size):
                raise ValueError(f"QuantExperts: group_size={group_size} needs mode W8A16 and must divide K={k} of {p}")
            sshape = (num_experts, n, k // group_size) if group_size else (num_experts, n)
            self.register_buffer(p, torch.zeros(num_experts, n, k, dtype=torch.int8, device=device))
            self.register_buffer(f"{p}_scale", torch.ones(sshape, dtype=torch.float32, device=device))

    @classmethod
    def from_float(cls, module: nn.Module, mode: str, group_size: int = 0) -> "QuantExperts":
        """RTN int8 of each expert's weights of `module` (a transformers experts module); `module` is not changed."""
        projections = fused_projections(module)
        if not projections:
            raise TypeError(f"QuantExperts.from_float: {type(module).__name__} holds no fused expert projections")
        weights = {}
        for p in projections:
            w = module._parameters[p].detach()
            weights[p] = w.transpose(1, 2) if module.is_transposed else w  # [E, N, K]
        e = next(iter(weights.values())).shape[0]
        q = cls({p: tuple(w.shape[1:]) for p, w in weights.items()}, e, mode, group_size,
                device=next(iter(weights.values())).device)
        with torch.no_grad():
            for p, w in weights.items():
                n, k = w.shape[1:]
                w_q, scale = quantize_weight(w.reshape(e * n, k), group_size)
                getattr(q, p).copy_(w_q.view(e, n, k))
                getattr(q, f"{p}_scale").copy_(scale.view(getattr(q, f"{p}_scale").shape))
        return q

    def _apply(self, fn, recurse=True):
        return super()._apply(keep_float32(fn, self, tuple(f"{p}_scale" for p in self.shapes)), recurse)

    def linear(self, proj: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (float) through expert `expert`'s projection `proj`: [M, N] in x's dtype."""
        w_q, scale = getattr(self, proj)[expert], getattr(self, f"{proj}_scale")[expert]
        if self.mode == "W8A16":
            return ops.w8a16_gemm(x, w_q, scale, None, self.group_size)
        x_q, x_scale = ops.quantize_per_token(x.contiguous())
        return ops.w8a8_gemm(x_q, x_scale, w_q, scale, None, x.dtype)

    def describe(self) -> dict:
        return {"kind": "experts", "mode": self.mode, "group_size": self.group_size,
                "num_experts": self.num_experts, "projections": {p: list(s) for p, s in self.shapes.items()}}

    @classmethod
    def from_description(cls, d: dict, device=None) -> "QuantExperts":
        _checks.description(d, "experts", ("mode", "group_size", "num_experts", "projections"), "QuantExperts")
        projections = d["projections"]
        if not isinstance(projections, dict) or not all(
                isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) for v in s) for s in projections.values()):
            raise ValueError(f"QuantExperts.from_description: projections must be {{name: [N, K]}}; got {projections!r}")
        return cls(projections, d["num_experts"], d["mode"], d["group_size"], device=device)

    def forward(self, *args, **kwargs):  # noqa: D401 -- holds weights; the experts forward reads them
        raise RuntimeError("QuantExperts is not called: the experts module's forward reads its weights")

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{p}=[{self.num_experts}, {n}, {k}]" for p, (n, k) in self.shapes.items())
        return f"mode={self.mode}, group_size={self.group_size}, {shapes}"


def expert_bias(module: nn.Module, proj: str) -> Optional[torch.Tensor]:
    b = getattr(module, f"{proj}_bias", None) if getattr(module, "has_bias", False) else None
    return b if isinstance(b, torch.Tensor) else None
