"""Scales stay float32 through a module's dtype casts.

``model.half()``, ``model.to(torch.bfloat16)`` and the like reach every floating buffer through
``nn.Module._apply``; the ops read float32 scales only, and the packed format records them so. A
module overrides ``_apply`` with ``keep_float32`` to let its scale buffers follow a device move but
not a dtype cast.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def keep_float32(fn: Callable, module: nn.Module, names: Iterable[str]) -> Callable:
    """`fn` (what ``nn.Module._apply`` applies to each tensor), except that the buffers `names` of
    `module` come out float32: on the device fn would put them on, with their float32 values (never
    rounded through the cast's dtype)."""
    keep = {id(t) for t in (module._buffers.get(n) for n in names) if t is not None}

    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        if id(t) in keep and isinstance(out, torch.Tensor) and out.dtype != torch.float32:
            return t.to(device=out.device, dtype=torch.float32)
        return out

    return apply
