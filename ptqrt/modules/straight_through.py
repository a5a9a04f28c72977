"""The gradient of a quantized linear: what QuantLinear and QuantExperts run when a gradient is wanted.

ptqrt's ops have no autograd formulas (int8 codes have no gradient). So that a quantized model can still
be differentiated (saliency, adapters trained on top, an input optimised through it) and compiled while
gradients are on (torch.compile traces the backward when any input needs a gradient, as a float norm
or embedding in front of every layer does), a quantized linear called with an input or bias that
needs a gradient runs as one autograd function: its forward is the int8 op sequence itself; its
backward is the gradient of x @ Ŵᵀ + b, with Ŵ the dequantized weight the kernels use (smoothing
divided back out). That is the exact gradient for W8A16 and the straight-through estimator of the
activation rounding for W8A8: the same in every mode, never a silently missing path.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..reference import dequantize_weight


class _Int8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, weight, weight_scale, smooth, run, group_size):
        ctx.save_for_backward(weight, weight_scale, smooth)
        ctx.group_size = group_size
        ctx.bias_dtype = None if bias is None else bias.dtype
        return run(x, bias)

    @staticmethod
    def backward(ctx, grad):
        weight, weight_scale, smooth = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = dequantize_weight(weight, weight_scale, ctx.group_size)
            if smooth is not None:
                w = w / smooth.float()[None, :]
            grad_x = (grad.float() @ w).to(grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.float().sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None, None, None, None


def needs_grad(x: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def int8_linear(x: torch.Tensor, bias: Optional[torch.Tensor], weight: torch.Tensor, weight_scale: torch.Tensor,
                smooth: Optional[torch.Tensor], group_size: int,
                run: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """run(x, bias) (the int8 ops: x [M, K] -> [M, N]) with the gradient of x @ Ŵᵀ + bias where one is
    wanted (weight int8 [N, K], weight_scale per channel or per group, smooth [K] or None)."""
    if not needs_grad(x, bias):
        return run(x, bias)
    return _Int8Linear.apply(x, bias, weight, weight_scale, smooth, run, group_size)


__all__ = ["int8_linear", "needs_grad"]
