"""Shared test helpers: poisoned outputs, fresh random inputs, per-dtype tolerances."""
from __future__ import annotations

import torch

# Odd shapes the DESIGN asks every kernel to survive.
ODD_M = (1, 2, 3, 16, 17, 127)
ODD_NK = ((33, 47), (72, 100), (130, 17))

# Absolute/relative tolerance of a low-precision result vs the float32 reference.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2), torch.bfloat16: (1e-1, 2e-2)}


def rand_int8(*shape, device="cpu") -> torch.Tensor:
    """Uniform in [-127, 127], never all zeros."""
    return torch.randint(-127, 128, shape, dtype=torch.int8, device=device)


def rand_scale(n, device="cpu") -> torch.Tensor:
    return (torch.rand(n, device=device) * 0.02 + 1e-3).to(torch.float32)


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's shape filled with values no kernel produces on purpose (NaN / extreme ints)."""
    if t.is_floating_point():
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, torch.iinfo(t.dtype).min)


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor, lowp_ref: torch.Tensor | None = None, factor=2.0):
    """out within max(2x the error of the same math in out's low precision, the dtype tolerance) of ref."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.dtype == ref.dtype or lowp_ref is not None
    o, r = out.float(), ref.float()
    assert torch.isfinite(o).all() == torch.isfinite(r).all(), "non-finite values differ"
    atol, rtol = TOL.get(out.dtype, (1e-4, 1e-4))
    if lowp_ref is not None:
        err_ref = (lowp_ref.float() - r).abs().max().item()
        atol = max(atol, factor * err_ref)
    torch.testing.assert_close(o, r, atol=atol, rtol=rtol)
