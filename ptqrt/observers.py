"""Statistics collected during calibration, one observer per quantized layer input.

MinMaxObserver keeps the running absmax per input channel (for SmoothQuant) and per tensor (for static
W8A8 scales). percentile_absmax gives a quantile of |x| instead of its max (PTQConfig.act_observer =
"percentile", over kept calibration rows), which trades a few clipped outliers for finer steps on
everything else.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


class MinMaxObserver:
    """Running max of |x| over all tokens seen: per channel [K] and per tensor (scalar)."""

    def __init__(self) -> None:
        self.channel_absmax: Optional[torch.Tensor] = None
        self.tokens = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        if x2.shape[0] == 0:
            return
        # NaN/Inf in calibration data would poison every scale: ignore them, but say so at the end.
        a = torch.nan_to_num(x2.float().abs(), nan=0.0, posinf=0.0).amax(dim=0).cpu()
        self.channel_absmax = a if self.channel_absmax is None else torch.maximum(self.channel_absmax, a)
        self.tokens += x2.shape[0]

    @property
    def absmax(self) -> torch.Tensor:
        if self.channel_absmax is None:
            raise RuntimeError("observer saw no data: the layer never ran during calibration")
        return self.channel_absmax.amax()


def percentile_absmax(x: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of |x| over all its elements, float32 0-d: the ceil(q * n)-th smallest (q = 1 gives
    the max). NaN and Inf count as 0, as in MinMaxObserver. x must not be empty."""
    flat = torch.nan_to_num(x.detach().float().abs().flatten(), nan=0.0, posinf=0.0)
    if not flat.numel():
        raise ValueError("percentile_absmax: x is empty")
    k = min(flat.numel(), max(1, math.ceil(q * flat.numel() - 1e-9)))
    return flat.kthvalue(k).values
