"""GPTQ: Hessian-aware rounding of int8 weights, one column at a time with error feedback.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(ICLR 2023, arXiv:2210.17323), after Optimal Brain Quantization (Frantar & Alistarh, arXiv:2208.11580).
For a linear with weight W [N, K] and calibration inputs X [T, K], GPTQ minimises

    ‖X Wᵀ − X Ŵᵀ‖²_F = tr((W − Ŵ) H (W − Ŵ)ᵀ) / (2/T),      H = (2/T) XᵀX  [K, K]

by quantizing column j, then spreading its error e_j = (w_j − ŵ_j) / U_jj over the not yet
quantized columns through the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): w_{j+1:} −= e_j U_{j, j+1:}.
Columns are processed in blocks whose updates to later columns are applied lazily, once per block.

Quantization matches ``ptqrt.reference.quantize_weight``: symmetric, q = clamp(round_half_even(w / s),
−127, 127), s = absmax / 127 (0 -> 1). Per channel, s comes from the original weights; per group, from
the weights as updated so far when the sweep reaches the group's first column (as GPTQ does), or with
act_order from the original weights of each group up front ("static groups"), so that scales stay
indexed by the original column groups and the packed format needs no column permutation.

Pure tensor math: no modules, no kernels.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..reference import absmax_scale, round_clamp_int8


def accumulate_hessian(H: Optional[torch.Tensor], x: torch.Tensor, n_seen: int,
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
    """Fold a batch of inputs into the running Hessian H = (2 / n) Σ_t x_t x_tᵀ.

    H: [K, K] from earlier batches or None (starts at zeros in ``dtype``, float32 by default; pass
    float64 for very long calibration runs). x: [..., K], any float dtype; every row is one token.
    n_seen: tokens already in H. Returns (H', n_seen + T) with
    H' = H · n / (n + T) + (2 / (n + T)) · xᵀx, computed in H's dtype (in place on H when given).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor [..., K], got {getattr(x, 'shape', type(x))}")
    if n_seen < 0:
        raise ValueError(f"n_seen must be >= 0, got {n_seen}")
    k = x.shape[-1]
    x2 = x.detach().reshape(-1, k)
    if H is None:
        if n_seen:
            raise ValueError(f"H is None but n_seen={n_seen}: pass the H those tokens went into")
        H = torch.zeros(k, k, dtype=dtype, device=x.device)
    elif H.shape != (k, k):
        raise ValueError(f"H must be [K, K] = [{k}, {k}] to match x [..., {k}], got {tuple(H.shape)}")
    t = x2.shape[0]
    if t == 0:
        return H, n_seen
    n = n_seen + t
    xf = x2.to(device=H.device, dtype=H.dtype)
    H.mul_(n_seen / n)
    H.addmm_(xf.T, xf, alpha=2.0 / n)
    return H, n


def _hinv_upper(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp · mean(diag H) · I)⁻¹, computed in float64."""
    Hd = H.to(torch.float64)
    Hd.diagonal().add_(damp * Hd.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(Hd)
    if info.item() == 0:
        Hinv = torch.cholesky_inverse(L)
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if info.item() != 0:
        raise ValueError(f"the Hessian is not positive definite after damping (damp={damp}); "
                         "use a larger damp or more calibration tokens")
    return U


def _check(w: torch.Tensor, H: torch.Tensor, group_size: int, block_size: int, damp: float) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a float 2-D tensor [N, K], got {getattr(w, 'shape', type(w))} "
                         f"{getattr(w, 'dtype', '')}")
    n, k = w.shape
    if not isinstance(H, torch.Tensor) or H.shape != (k, k):
        raise ValueError(f"H must be [K, K] = [{k}, {k}] for w [{n}, {k}], got {getattr(H, 'shape', type(H))}")
    if not torch.isfinite(w).all():
        raise ValueError("w contains NaN or Inf")
    if not torch.isfinite(H).all():
        raise ValueError("H contains NaN or Inf: the calibration activations are broken")
    if (H.diagonal() < 0).any():
        raise ValueError("H has a negative diagonal entry: it is not a Gram matrix (2/T) XᵀX")
    if group_size < 0 or (group_size and k % group_size):
        raise ValueError(f"group_size={group_size} must be 0 (per channel) or a positive divisor of K={k}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp}")


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, group_size: int = 0, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize w [N, K] to int8 with GPTQ given the Hessian H [K, K] of its inputs.

    group_size: 0 -> one scale per output channel, float32 [N]; g > 0 (dividing K) -> float32
    [N, K // g], scale[:, i] for original columns i·g .. (i+1)·g − 1, exactly the layout of
    ``reference.quantize_weight`` / ``dequantize_weight``. block_size: columns per lazy-update block.
    damp: λ = damp · mean(diag H) is added to diag H. act_order: quantize columns in order of
    decreasing diag H (the ones with the largest inputs first); the result is returned in the original
    column order. Columns with diag H == 0 never see a non-zero input: they get H_ii = 1 and are
    quantized as 0. All math in float32 on w's device (the Cholesky in float64).
    Returns (w_q int8 [N, K], w_scale float32).
    """
    _check(w, H, group_size, block_size, damp)
    n, k = w.shape
    W = w.detach().to(torch.float32).clone()
    if n == 0 or k == 0:
        shape = (n, k // group_size) if group_size else (n,)
        return torch.empty(n, k, dtype=torch.int8, device=w.device), torch.ones(shape, device=w.device)
    H = H.detach().to(device=w.device, dtype=torch.float32).clone()

    static = group_size > 0 and act_order
    if group_size == 0:
        scale = absmax_scale(W.abs().amax(dim=1))  # [N], from the original weights
    elif static:
        scale = absmax_scale(W.reshape(n, k // group_size, group_size).abs().amax(dim=2))  # [N, K // g]
    else:
        scale = torch.ones(n, k // group_size, device=w.device)  # filled as the sweep reaches each group

    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0

    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    # group of the original column at each swept position (a host list: no device sync per column)
    order = perm.tolist() if perm is not None else range(k)
    groups = [c // group_size for c in order] if group_size else None
    U = _hinv_upper(H, damp).to(torch.float32)
    del H

    Q = torch.empty(n, k, dtype=torch.int8, device=w.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty(n, i2 - i1, device=w.device)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if group_size and not static and j % group_size == 0:
                # The group's columns as the sweep has updated them so far: the ones in this block
                # hold every update; the ones past it still lack this block's pending updates.
                g_end = min(j + group_size, k)
                cur = W1[:, i:min(i2, g_end) - i1]
                if g_end > i2:
                    tail = W[:, i2:g_end] - Err1[:, :i] @ U[i1:j, i2:g_end]
                    cur = torch.cat([cur, tail], dim=1)
                scale[:, j // group_size] = absmax_scale(cur.abs().amax(dim=1))
            s = scale if group_size == 0 else scale[:, groups[j]]
            wj = W1[:, i]
            q = round_clamp_int8(wj / s)
            Q[:, j] = q
            err = (wj - q.to(torch.float32) * s) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        if i2 < k:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q, scale
