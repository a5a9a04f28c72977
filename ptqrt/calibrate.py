"""The calibration driver: run calibration samples through the float model and collect, per target
layer, the statistics of its input (MinMax observers via forward pre-hooks)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from .observers import MinMaxObserver


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


def run_sample(model: nn.Module, sample):
    """model(sample) for a tensor, model(*sample) for a tuple/list, model(**sample) for a mapping."""
    if isinstance(sample, Mapping):
        return model(**sample)
    if isinstance(sample, (tuple, list)):
        return model(*sample)
    return model(sample)


@contextmanager
def observing(modules: dict[str, nn.Module], factory=MinMaxObserver):
    """Attach an observer to the input of each module; yields {name: observer}."""
    observers = {name: factory() for name in modules}
    handles = []
    for name, mod in modules.items():
        def hook(_mod, args, kwargs, _obs=observers[name]):
            x = args[0] if args else next(iter(kwargs.values()))
            _obs.update(x)
        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield observers
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_input_stats(model: nn.Module, modules: dict[str, nn.Module], calib_data: Iterable,
                        quiet: bool = False, factory=MinMaxObserver) -> dict:
    """{name: observer} after running every sample of calib_data through model."""
    from tqdm.auto import tqdm

    if isinstance(calib_data, (torch.Tensor, Mapping)):
        calib_data = [calib_data]  # one sample given bare
    device = model_device(model)
    seen = 0
    with observing(modules, factory) as observers:
        for sample in tqdm(calib_data, desc="calibrating", unit="sample", disable=quiet):
            run_sample(model, to_device(sample, device))
            seen += 1
    if seen == 0:
        raise ValueError("calib_data is empty: calibration needs at least one sample")
    silent = [n for n, o in observers.items() if o.channel_absmax is None]
    if silent:
        raise ValueError(f"calibration never ran these layers, so they cannot get static scales: "
                         f"{silent[:5]}{' ...' if len(silent) > 5 else ''}")
    return observers


def first_param_dtype(module: nn.Module) -> Optional[torch.dtype]:
    for p in module.parameters():
        return p.dtype
    return None
