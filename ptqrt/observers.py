"""Statistics collected during calibration, one observer per quantized layer input.

MinMaxObserver keeps the running absmax per input channel (for SmoothQuant) and per tensor (for static
W8A8 scales). percentile_absmax gives a quantile of |x| instead of its max (PTQConfig.act_observer =
"percentile", over kept calibration rows), which trades a few clipped outliers for finer steps on
everything else. RowSample keeps those rows (and OSL's): a uniform sample of every calibration token.
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


def static_range(x: torch.Tensor, q: float, top: torch.Tensor) -> torch.Tensor:
    """The range a static scale is set from under a percentile observer: the q-quantile of |x|
    (percentile_absmax), or `top` (the max) where that is 0 (a sparse input, which it would zero)."""
    r = percentile_absmax(x, q)
    return r if r > 0 else top


class RowSample:
    """A uniform sample, without replacement, of at most n of all the rows recorded (float32, on the CPU):
    each row draws a random key and the rows with the n smallest keys stay, so every calibration token is
    as likely to be kept as any other, whatever the lengths of the calls and wherever it sits in its
    sequence (a first token with a large activation is kept as often as it occurs, no more). A call's
    rows that do not make it into the sample never leave their device; a row that does is written over
    the one it evicts, in place (the sample is never copied whole). The keys come from a generator
    seeded with `seed`, so a run is repeatable and targets that read the same input (q, k, v) keep the
    same rows."""

    def __init__(self, n: int, seed: int = 0):
        self.n = n
        self.gen = torch.Generator().manual_seed(seed)
        self.keys = torch.empty(0)               # of the filled slots, [count]
        self._buf: Optional[torch.Tensor] = None  # [capacity, K]; grows by doubling up to n rows

    @property
    def rows(self) -> Optional[torch.Tensor]:
        """The kept rows [count, K] (None before the first)."""
        return None if self._buf is None else self._buf[: self.keys.numel()]

    def add(self, x2: torch.Tensor) -> None:
        keys = torch.rand(x2.shape[0], generator=self.gen)
        count = self.keys.numel()
        cand = torch.arange(keys.numel())
        if count >= self.n:
            cand = (keys < self.keys.max()).nonzero().squeeze(1)
        if cand.numel() > self.n:
            cand = cand[keys[cand].topk(self.n, largest=False).indices]
        if not cand.numel():
            return
        new_keys = keys[cand]
        every = torch.cat([self.keys, new_keys])
        if every.numel() <= self.n:  # room for all of them
            slots, taken = torch.arange(count, every.numel()), torch.arange(cand.numel())
        else:  # the n smallest keys stay: new rows go to the slots evicted, then to the ones never used
            keep = torch.zeros(every.numel(), dtype=torch.bool)
            keep[every.topk(self.n, largest=False).indices] = True
            taken = keep[count:].nonzero().squeeze(1)
            slots = torch.cat([(~keep[:count]).nonzero().squeeze(1), torch.arange(count, self.n)])[: taken.numel()]
        size = max(count, int(slots.max()) + 1) if slots.numel() else count
        if self.keys.numel() < size:
            self.keys = torch.cat([self.keys, torch.empty(size - self.keys.numel())])
        self.keys[slots] = new_keys[taken]
        rows = x2[cand[taken].to(x2.device)].detach().float().cpu()
        if self._buf is None or self._buf.shape[0] < size:
            cap = min(self.n, max(size, 2 * (0 if self._buf is None else self._buf.shape[0])))
            buf = torch.empty(cap, x2.shape[1])
            if self._buf is not None:
                buf[:count] = self._buf[:count]
            self._buf = buf
        self._buf[slots] = rows
