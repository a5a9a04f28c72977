"""Calibration plumbing shared by the drivers: where a model lives, moving samples there, and
calling a model on one calibration sample (tensor, tuple of args, or dict of kwargs).
The layer-by-layer driver that uses it is ptqrt/layerwise.py."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def to_device(sample, device: torch.device):
    if isinstance(sample, torch.Tensor):
        return sample.to(device)
    if isinstance(sample, Mapping):
        return {k: to_device(v, device) for k, v in sample.items()}
    if isinstance(sample, (tuple, list)):
        return type(sample)(to_device(v, device) for v in sample)
    return sample


def token_mask(sample):
    """A calibration sample's 2-D attention_mask [B, T] (1 for real tokens, 0 for padding), or None."""
    mask = sample.get("attention_mask") if isinstance(sample, Mapping) else None
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def run_sample(model: nn.Module, sample):
    """model(sample) for a tensor, model(*sample) for a tuple/list, model(**sample) for a mapping."""
    if isinstance(sample, Mapping):
        return model(**sample)
    if isinstance(sample, (tuple, list)):
        return model(*sample)
    return model(sample)
