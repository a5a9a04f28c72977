"""OSL (outlier suppression lite): per layer, pick SmoothQuant's α by the quantized output's error.

After the α search of Wei et al., "Outlier Suppression+: Accurate quantization of large language
models by equivalent and optimal shifting and scaling" (EMNLP 2023, arXiv:2304.09145) and the
SmoothQuant α sweep (Xiao et al., arXiv:2211.10438), as MindSpore Golden Stick's PTQ does it: for each
α on a grid, smooth with s(α) = smooth_scales(max|X|, max|W|, α), quantize the activation x / s to
int8 (static per-tensor or dynamic per-token scale) and each weight W · s to int8 per output channel
(RTN), run the int8 GEMM of ``ptqrt.reference``, and keep the α whose output is closest (MSE) to the
float output x Wᵀ + b.

Pure tensor math: no modules, no kernels.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import reference
from ..observers import static_range
from .smoothquant import scale_linear_weight, smooth_scales, weight_absmax_per_in_channel

DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0.0, 0.05, ..., 1.0
GRANULARITIES = ("per_tensor", "per_token")

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_list(name: str, v, n: Optional[int] = None) -> list:
    if v is None:
        return [None] * (n or 1)
    out = [v] if isinstance(v, torch.Tensor) else list(v)
    if n is not None and len(out) != n:
        raise ValueError(f"{name} has {len(out)} entries but there are {n} weights")
    return out


def quantized_output(x: torch.Tensor, weights: TensorOrList, biases, s: torch.Tensor,
                     act_granularity: str = "per_tensor",
                     act_absmax: Optional[torch.Tensor] = None,
                     act_percentile: Optional[float] = None) -> list[torch.Tensor]:
    """W8A8 outputs float32 [T, N_i], one per weight, of the layer smoothed by s [K].

    x [T, K] -> x / s quantized with a static per-tensor scale max_j(act_absmax_j / s_j) / 127 (what
    calibration stores; act_absmax [K] defaults to x's own max|x_j|, pass the whole calibration set's
    when x is a subsample of it), or with act_percentile the act_percentile quantile of |x / s| / 127
    (observers.percentile_absmax; the max where it is 0), or dynamic per-token scales; W_i · s quantized
    per output channel; then reference.w8a8_gemm(x_q, x_scale, w_q, w_scale, b_i) in float32.
    """
    if act_granularity not in GRANULARITIES:
        raise ValueError(f"act_granularity must be one of {GRANULARITIES}, got {act_granularity!r}")
    if act_absmax is not None and tuple(act_absmax.shape) != (x.shape[-1],):
        raise ValueError(f"act_absmax must be [K={x.shape[-1]}], got {tuple(act_absmax.shape)}")
    ws = _as_list("weights", weights)
    bs = _as_list("bias", biases, len(ws))
    if act_granularity == "per_token":
        x_q, x_scale = reference.quantize_per_token(x, s)
    else:
        a = x.to(torch.float32).abs().amax(dim=0) if act_absmax is None else act_absmax.to(x.device, torch.float32)
        r = (a / s).amax()
        if act_percentile is not None:  # its max where the quantile is 0 (a sparse input), as calibration does
            r = static_range(x.to(torch.float32) / s, act_percentile, r)
        x_scale = reference.absmax_scale(r).reshape(1)
        x_q = reference.quantize_per_tensor(x, x_scale, s)
    outs = []
    xf = x_q.to(torch.float32)
    for w, b in zip(ws, bs):
        w_q, w_scale = reference.quantize_weight(scale_linear_weight(w.to(torch.float32), s))
        # The int8 products summed in float32 rather than exactly (reference.w8a8_gemm, float64): the
        # search only ranks α by MSE, and a float32 GEMM is many times faster on every device.
        acc = xf @ w_q.to(torch.float32).T
        outs.append(reference.w8a8_epilogue(acc, x_scale, w_scale, b, torch.float32))
    return outs


def search_alpha(x: torch.Tensor, weight: TensorOrList, bias=None, grid: Sequence[float] = DEFAULT_GRID,
                 act_granularity: str = "per_tensor",
                 act_absmax: Optional[torch.Tensor] = None,
                 act_percentile: Optional[float] = None) -> tuple[float, torch.Tensor]:
    """Grid-search SmoothQuant's α for one input shared by one or more linears.

    x: [T, K] float calibration activations (T >= 1, finite). weight: [N, K] or a list of [N_i, K]
    (e.g. q, k, v reading the same normed hidden state). bias: None, [N], or a list matching weight
    (entries may be None). grid: candidate α values in [0, 1]. act_granularity: "per_tensor" (static
    scale) or "per_token" (dynamic), matching how the layer will run. act_absmax: optional [K]
    max|X_j| observed over the whole calibration set, when x is only a subsample of it (default: x's);
    it sets s(α) and the static per-tensor scale, as calibration will. act_percentile: the static scale
    from that quantile of |x / s(α)| instead (PTQConfig.act_observer="percentile").

    For each α: err(α) = Σ_i mean_{t,n} (ŷ_i(α)[t, n] - y_i[t, n])², with y_i = x W_iᵀ + b_i in float32
    and ŷ_i(α) from ``quantized_output``. Returns (α*, s(α*) float32 [K]) for the smallest err, the
    first such α in grid order on ties. Cost: len(grid) int8 GEMMs of [T, K] x [K, ΣN_i] in the
    reference's exact float64 arithmetic — pass a token subsample when T is large.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a float 2-D tensor [T, K], got {getattr(x, 'shape', type(x))} "
                         f"{getattr(x, 'dtype', '')}")
    if x.shape[0] == 0:
        raise ValueError("x has no tokens (T == 0): calibrate on at least one token")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or Inf: the calibration activations are broken")
    if act_granularity not in GRANULARITIES:
        raise ValueError(f"act_granularity must be one of {GRANULARITIES}, got {act_granularity!r}")
    grid = [float(a) for a in grid]
    if not grid:
        raise ValueError("grid is empty")
    if any(not 0.0 <= a <= 1.0 for a in grid):
        raise ValueError(f"every alpha in grid must be in [0, 1], got {grid}")
    ws = _as_list("weight", weight)
    w_absmax = weight_absmax_per_in_channel(ws)  # also checks that every weight is [N_i, K]
    if w_absmax.shape[0] != x.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} in-features but weight has K={w_absmax.shape[0]}")
    bs = _as_list("bias", bias, len(ws))
    for i, (w, b) in enumerate(zip(ws, bs)):
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"bias[{i}] must be [N={w.shape[0]}], got {tuple(b.shape)}")
    w_absmax = w_absmax.to(x.device)

    xf = x.detach().to(torch.float32)
    ws = [w.detach().to(device=x.device, dtype=torch.float32) for w in ws]
    bs = [None if b is None else b.detach().to(device=x.device, dtype=torch.float32) for b in bs]
    refs = [xf @ w.T if b is None else xf @ w.T + b for w, b in zip(ws, bs)]
    if act_absmax is None:
        act_absmax = xf.abs().amax(dim=0)
    elif tuple(act_absmax.shape) != (x.shape[1],):
        raise ValueError(f"act_absmax must be [K={x.shape[1]}], got {tuple(act_absmax.shape)}")
    else:
        act_absmax = act_absmax.detach().to(device=x.device, dtype=torch.float32)

    best = (float("inf"), None, None)
    for a in grid:
        s = smooth_scales(act_absmax, w_absmax, a)
        outs = quantized_output(xf, ws, bs, s, act_granularity, act_absmax, act_percentile)
        err = sum(((o - r) ** 2).mean().item() for o, r in zip(outs, refs))
        if err < best[0]:
            best = (err, a, s)
    if best[1] is None:  # every candidate gave a NaN error: nothing to choose between
        raise ValueError("the quantized output error is NaN for every alpha; check the weights for NaN/Inf")
    return best[1], best[2]
