"""Statistics collected during calibration, one observer per quantized layer input.

MinMaxObserver keeps the running absmax per input channel (for SmoothQuant) and per tensor (for static
W8A8 scales). PercentileObserver clips the per-tensor statistic at a quantile of |x| averaged over
batches, which trades a few clipped outliers for finer steps on everything else.
"""
from __future__ import annotations

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


class PercentileObserver(MinMaxObserver):
    """As MinMaxObserver, but `absmax` is the mean over batches of the q-quantile of |x| (q = 0.9999)."""

    def __init__(self, q: float = 0.9999) -> None:
        super().__init__()
        if not 0.0 < q <= 1.0:
            raise ValueError(f"PercentileObserver: q must be in (0, 1]; got {q}")
        self.q, self._sum, self._n = q, 0.0, 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        flat = torch.nan_to_num(x.detach().float().abs().flatten(), nan=0.0, posinf=0.0)
        if flat.numel():
            k = max(1, int(round(self.q * flat.numel())))
            self._sum += float(flat.kthvalue(k).values)
            self._n += 1

    @property
    def absmax(self) -> torch.Tensor:
        if not self._n:
            raise RuntimeError("observer saw no data: the layer never ran during calibration")
        return torch.tensor(self._sum / self._n)
