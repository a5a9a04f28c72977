"""QuantExperts: int8 weights of fused MoE experts (transformers' experts modules, and Llama-4's, which
hold every expert's weights as one 3-D tensor per projection instead of an nn.Linear each).

It is attached as the child ``ptqrt_experts`` of the experts module, whose float 3-D parameters it
replaces; the experts forward that reads it is ``ptqrt.integrations.hf_experts``. Buffers, per
projection P (gate_up_proj or up_proj, and down_proj), all persistent:
  P              int8 [E, N, K]                     each expert's RTN/GPTQ weights (W·s when smoothed),
                                                    [out, in] whatever the module's layout ([E, K, N]
                                                    when transposed)
  P_scale        float32 [E, N] or [E, N, K // g]   per channel or per group (W8A16 only)
  P_input_scale  float32 [E]                        W8A8 (static) only: each expert's calibrated input
                                                    absmax / 127
  P_smooth_scale float32 [E, K], optional           each expert's SmoothQuant / OSL factors: x / s
Modes as QuantLinear's: W8A16 (float activations, dequant fused in the GEMM), W8A8_DYNAMIC (per-token
int8 activations) and W8A8 (a static per-tensor scale per expert). The calibration that gives static
scales, smoothing and GPTQ per expert is in ``ptqrt.layerwise_experts``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import _checks, ops
from ..reference import absmax_scale, quantize_weight
from .scales import keep_float32
from .straight_through import int8_linear

MODES = ("W8A16", "W8A8", "W8A8_DYNAMIC")  # as QuantLinear's
PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")  # the 3-D parameters transformers' experts hold


def dense(module: nn.Module) -> bool:
    """Llama-4's experts module (Llama4TextExperts): every expert runs on every token, the router's weight
    already multiplied into its input, so a token runs through the experts it is not routed to on a row of
    zeros. Its forward takes that input alone, [E * T, K] expert by expert; gate_up_proj [E, K, 2 I] and
    down_proj [E, I, K] are stored transposed, gate first."""
    return type(module).__name__ == "Llama4TextExperts" and hasattr(module, "act_fn")


def fused_projections(module: nn.Module) -> list[str]:
    """The 3-D float projection parameters of a transformers experts module that dispatches through
    its experts interface (``use_experts_implementation``), or of Llama-4's (``dense``); [] for any
    other module."""
    if not dense(module) and (not hasattr(module, "has_gate") or not hasattr(module, "is_transposed")):
        return []
    found = [p for p in PROJECTIONS if isinstance(module._parameters.get(p), torch.Tensor)
             and module._parameters[p].dim() == 3 and module._parameters[p].is_floating_point()]
    if dense(module) and found != ["gate_up_proj", "down_proj"]:
        return []
    return found if "down_proj" in found and len(found) == 2 else []


def transposed(module: nn.Module) -> bool:
    """Whether an experts module stores its projections [E, K, N] (in, out) rather than [E, N, K]."""
    return dense(module) or bool(module.is_transposed)


def expert_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """{projection: [E, N, K] float weights} of an experts module (views: transposed layouts are not copied)."""
    return {p: module._parameters[p].detach().transpose(1, 2) if transposed(module) else module._parameters[p].detach()
            for p in fused_projections(module)}


class QuantExperts(nn.Module):
    """int8 weights of E experts for each projection; ``linear(p, e, x)`` runs expert e's projection p."""

    def __init__(self, projections: dict, num_experts: int, mode: str = "W8A16", group_size: int = 0,
                 smooth: bool = False, device=None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"QuantExperts: mode must be one of {MODES}; got {mode!r}")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
            raise ValueError(f"QuantExperts: num_experts must be a positive int; got {num_experts!r}")
        if not projections or any(p not in PROJECTIONS for p in projections):
            raise ValueError(f"QuantExperts: projections must be some of {PROJECTIONS}; got {list(projections)}")
        if not isinstance(smooth, bool) or (smooth and mode == "W8A16"):
            raise ValueError(f"QuantExperts: smooth must be a bool, and needs int8 activations (mode W8A8 or "
                             f"W8A8_DYNAMIC); got smooth={smooth!r} with mode {mode}")
        self.mode, self.group_size, self.num_experts, self.smooth = mode, group_size, num_experts, smooth
        self.shapes = {p: (int(n), int(k)) for p, (n, k) in projections.items()}
        for p, (n, k) in self.shapes.items():
            if n <= 0 or k <= 0:
                raise ValueError(f"QuantExperts: {p} must be [N, K] with N, K > 0; got {[n, k]}")
            if group_size and (mode != "W8A16" or k % group_size):
                raise ValueError(f"QuantExperts: group_size={group_size} needs mode W8A16 and must divide K={k} of {p}")
            sshape = (num_experts, n, k // group_size) if group_size else (num_experts, n)
            self.register_buffer(p, torch.zeros(num_experts, n, k, dtype=torch.int8, device=device))
            self.register_buffer(f"{p}_scale", torch.ones(sshape, dtype=torch.float32, device=device))
            if mode == "W8A8":
                self.register_buffer(f"{p}_input_scale", torch.ones(num_experts, dtype=torch.float32, device=device))
            if smooth:
                self.register_buffer(f"{p}_smooth_scale", torch.ones(num_experts, k, dtype=torch.float32, device=device))

    @classmethod
    def from_float(cls, module: nn.Module, mode: str, group_size: int = 0, *, smooth: Optional[dict] = None,
                   input_absmax: Optional[dict] = None, qweights: Optional[dict] = None) -> "QuantExperts":
        """int8 experts of `module` (a transformers experts module, which is not changed), per projection P:
        RTN weights of W·s unless `qweights[P]` = (w_q [E, N, K], scale) is given (GPTQ); `smooth[P]`
        [E, K] factors each expert's input is divided by at run time; `input_absmax[P]` [E] each expert's
        calibrated input absmax after smoothing (static W8A8, which needs it)."""
        weights = expert_weights(module)
        if not weights:
            raise TypeError(f"QuantExperts.from_float: {type(module).__name__} holds no fused expert projections")
        e = next(iter(weights.values())).shape[0]
        q = cls({p: tuple(w.shape[1:]) for p, w in weights.items()}, e, mode, group_size, smooth is not None,
                device=next(iter(weights.values())).device)
        if mode == "W8A8" and (input_absmax is None or sorted(input_absmax) != sorted(weights)):
            raise ValueError(f"QuantExperts.from_float: static W8A8 needs each expert's calibrated input absmax for "
                             f"{sorted(weights)}; got {sorted(input_absmax or {})}")
        with torch.no_grad():
            for p, w in weights.items():
                n, k = w.shape[1:]
                s = None if smooth is None else smooth[p].to(w.device, torch.float32)
                if qweights is not None and p in qweights:
                    w_q, scale = qweights[p]
                else:
                    wf = w.float() if s is None else w.float() * s[:, None, :]  # W·diag(s): x / s at run time
                    w_q, scale = quantize_weight(wf.reshape(e * n, k), group_size)
                getattr(q, p).copy_(w_q.reshape(e, n, k))
                getattr(q, f"{p}_scale").copy_(scale.reshape(getattr(q, f"{p}_scale").shape))
                if s is not None:
                    getattr(q, f"{p}_smooth_scale").copy_(s)
                if mode == "W8A8":
                    getattr(q, f"{p}_input_scale").copy_(absmax_scale(input_absmax[p].float().reshape(e)))
        return q

    def _apply(self, fn, recurse=True):
        names = tuple(f"{p}{leaf}" for p in self.shapes for leaf in ("_scale", "_input_scale", "_smooth_scale"))
        return super()._apply(keep_float32(fn, self, names), recurse)

    def linear(self, proj: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (float) through expert `expert`'s projection `proj`: [M, N] in x's dtype."""
        w_q, scale = getattr(self, proj)[expert], getattr(self, f"{proj}_scale")[expert]
        smooth = getattr(self, f"{proj}_smooth_scale")[expert] if self.smooth else None

        def int8(x, _bias):
            if self.mode == "W8A16":
                return ops.w8a16_gemm(x, w_q, scale, None, self.group_size)
            if self.mode == "W8A8_DYNAMIC":
                x_q, x_scale = ops.quantize_per_token(x.contiguous(), smooth)
            else:
                x_scale = getattr(self, f"{proj}_input_scale")[expert:expert + 1]
                x_q = ops.quantize_per_tensor(x.contiguous(), x_scale, smooth)
            return ops.w8a8_gemm(x_q, x_scale, w_q, scale, None, x.dtype)

        return int8_linear(x, None, w_q, scale, smooth, self.group_size, int8)  # the straight-through gradient

    def describe(self) -> dict:
        return {"kind": "experts", "mode": self.mode, "group_size": self.group_size, "num_experts": self.num_experts,
                "smooth": self.smooth, "projections": {p: list(s) for p, s in self.shapes.items()}}

    @classmethod
    def from_description(cls, d: dict, device=None) -> "QuantExperts":
        _checks.description(d, "experts", ("mode", "group_size", "num_experts", "projections"), "QuantExperts")
        projections = d["projections"]
        if not isinstance(projections, dict) or not all(
                isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) for v in s) for s in projections.values()):
            raise ValueError(f"QuantExperts.from_description: projections must be {{name: [N, K]}}; got {projections!r}")
        return cls(projections, d["num_experts"], d["mode"], d["group_size"], d.get("smooth", False), device=device)

    def forward(self, *args, **kwargs):  # noqa: D401 -- holds weights; the experts forward reads them
        raise RuntimeError("QuantExperts is not called: the experts module's forward reads its weights")

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{p}=[{self.num_experts}, {n}, {k}]" for p, (n, k) in self.shapes.items())
        smooth = ", smooth=True" if self.smooth else ""
        return f"mode={self.mode}, group_size={self.group_size}{smooth}, {shapes}"


def expert_bias(module: nn.Module, proj: str) -> Optional[torch.Tensor]:
    b = getattr(module, f"{proj}_bias", None) if getattr(module, "has_bias", False) else None
    return b if isinstance(b, torch.Tensor) else None
