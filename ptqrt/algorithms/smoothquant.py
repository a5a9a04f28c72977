"""SmoothQuant: migrate activation outliers into the weights with a per-in-channel scale.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models" (ICML 2023, arXiv:2211.10438). For a linear y = x Wᵀ with x [T, K] and W [N, K], any s > 0
of shape [K] leaves the float function unchanged:

    y = (x / s) (W · s)ᵀ        where (x / s)[t, j] = x[t, j] / s_j and (W · s)[n, j] = W[n, j] · s_j

and s_j = max|X_j|^α / max|W_j|^(1-α) balances how hard the two sides are to quantize (α = 0.5 by
default; larger α moves more of the range into the weights). The 1/s is folded into the preceding
LayerNorm/RMSNorm where there is one (``fold_into_norm``), else fused into ``quantize_per_token``.

Pure tensor math: no modules, no kernels. All functions are out of place.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

S_MIN = 1e-5
S_MAX = 1e5


def _check_vector(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor [K], got {getattr(t, 'shape', type(t))}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Per-in-channel smoothing factors s float32 [K].

    act_absmax: [K] max over calibration tokens of |X[:, j]|. weight_absmax: [K] max over the output
    channels of every linear that consumes X of |W[:, j]| (see ``weight_absmax_per_in_channel``).

        s_j = act_absmax_j ** alpha / weight_absmax_j ** (1 - alpha),   clamped to [1e-5, 1e5]

    computed in float64 and returned as float32. A channel whose act_absmax or weight_absmax is 0,
    NaN or Inf (a dead or broken channel, where the ratio means nothing) gets s_j = 1, i.e. is left
    alone. alpha = 0 gives 1 / max|W_j|; alpha = 1 gives max|X_j|. Needs 0 <= alpha <= 1.
    """
    _check_vector("act_absmax", act_absmax)
    _check_vector("weight_absmax", weight_absmax)
    if act_absmax.shape != weight_absmax.shape:
        raise ValueError(f"act_absmax {tuple(act_absmax.shape)} and weight_absmax {tuple(weight_absmax.shape)} "
                         "must have the same shape [K]")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = act_absmax.detach().to(torch.float64)
    w = weight_absmax.to(device=a.device).detach().to(torch.float64)
    if (a < 0).any() or (w < 0).any():
        raise ValueError("act_absmax and weight_absmax are absolute maxima and must be >= 0")
    good = torch.isfinite(a) & torch.isfinite(w) & (a > 0) & (w > 0)
    one = torch.ones_like(a)
    # pow on the masked values only, so 0 ** negative never produces Inf in the discarded branch
    s = torch.where(good, a, one).pow(alpha) / torch.where(good, w, one).pow(1.0 - alpha)
    s = torch.where(good & torch.isfinite(s), s, one)
    return s.clamp(S_MIN, S_MAX).to(torch.float32)


def weight_absmax_per_in_channel(weights: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
    """float32 [K]: max_j over every consumer linear W_i [N_i, K] (e.g. q, k and v) of max_n |W_i[n, j]|.

    The linears that read the same activation share one s, so they share one weight range per in-channel.
    """
    ws = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    if not ws:
        raise ValueError("weights is empty: need at least one [N, K] weight")
    k = None
    out = None
    for i, w in enumerate(ws):
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"weights[{i}] must be a 2-D tensor [N, K], got {getattr(w, 'shape', type(w))}")
        if k is None:
            k = w.shape[1]
        elif w.shape[1] != k:
            raise ValueError(f"weights[{i}] has K={w.shape[1]} but weights[0] has K={k}: "
                             "only linears that consume the same input can share smoothing")
        m = w.detach().to(torch.float32).abs().amax(dim=0) if w.shape[0] else torch.zeros(k, device=w.device)
        out = m if out is None else torch.maximum(out, m.to(out.device))
    return out


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # float32 for half types (one rounding, at the final cast), float64 stays float64
    return torch.promote_types(t.dtype, torch.float32)


def _check_scale(s: torch.Tensor, k: int, what: str) -> None:
    if not isinstance(s, torch.Tensor) or s.shape != (k,):
        raise ValueError(f"s must be a tensor [K={k}] matching {what}, got {getattr(s, 'shape', type(s))}")


def fold_into_norm(norm_weight: torch.Tensor, norm_bias: Optional[torch.Tensor], s: torch.Tensor,
                   offset: float = 0.0) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Fold 1/s into a LayerNorm/RMSNorm's affine part: (γ', β' or None).

    A norm whose output is x̂ · (offset + γ) + β — offset 0 for LayerNorm / RMSNorm, offset 1 for the
    norms that scale by (1 + γ) (Gemma, VaultGemma, Qwen3-Next) — gives norm(x) / s with

        γ' = (offset + γ) / s − offset,    β' = β / s

    norm_weight γ [K], norm_bias β [K] or None, s [K]; computed in float32 (float64 for float64
    inputs) and cast back to each input's dtype. Which form a norm has is the caller's to know.
    """
    _check_vector("norm_weight", norm_weight)
    _check_scale(s, norm_weight.shape[0], "norm_weight")
    ct = _compute_dtype(norm_weight)
    sf = s.to(device=norm_weight.device, dtype=ct)
    new_w = ((offset + norm_weight.detach().to(ct)) / sf - offset).to(norm_weight.dtype)
    new_b = None
    if norm_bias is not None:
        _check_vector("norm_bias", norm_bias)
        _check_scale(s, norm_bias.shape[0], "norm_bias")
        ct = _compute_dtype(norm_bias)
        new_b = (norm_bias.detach().to(ct) / s.to(device=norm_bias.device, dtype=ct)).to(norm_bias.dtype)
    return new_w, new_b


def scale_linear_weight(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W · s: w [N, K] times s [K] along the in-features, computed in float32 (float64 for float64 w),
    returned in w.dtype."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"w must be a 2-D tensor [N, K], got {getattr(w, 'shape', type(w))}")
    _check_scale(s, w.shape[1], "w's in-features")
    ct = _compute_dtype(w)
    return (w.detach().to(ct) * s.to(device=w.device, dtype=ct)[None, :]).to(w.dtype)
