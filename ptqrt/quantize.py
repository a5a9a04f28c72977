"""quantize(): calibrate -> convert -> swap modules, on any nn.Module."""
from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch
from torch import nn

from .calibrate import collect_input_stats
from .config import PTQConfig
from .modules.linear import QuantLinear, is_quantizable, linear_weight


def find_targets(model: nn.Module, config: PTQConfig) -> dict[str, tuple[nn.Module, PTQConfig]]:
    """{name: (module, layer config)} for every Linear/Conv1D not skipped."""
    out = {}
    for name, mod in model.named_modules():
        if name and is_quantizable(mod) and not config.is_skipped(name):
            out[name] = (mod, config.for_layer(name))
    return out


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _unimplemented(cfg: PTQConfig, name: str) -> None:
    for field, val, default in (("outliers", cfg.outliers, "none"), ("precision_recovery", cfg.precision_recovery, "none"),
                                ("kv_cache_dtype", cfg.kv_cache_dtype, None)):
        if val != default:
            raise NotImplementedError(f"PTQConfig.{field}={val!r} (layer {name or 'model'}) is not implemented yet")


@torch.no_grad()
def quantize(model: nn.Module, config: PTQConfig, calib_data: Optional[Iterable] = None, *,
             quiet: bool = False) -> nn.Module:
    """Quantize `model` in place with `config` and return it.

    Every nn.Linear (and GPT-2 Conv1D) whose name is not in config.skip becomes a QuantLinear with the
    config of the first matching layer policy. calib_data is an iterable of model inputs (a tensor,
    a tuple of positional args, or a dict of keyword args), needed for static W8A8; None otherwise.
    Device and dtype of every layer are kept.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize: model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(config, PTQConfig):
        raise TypeError(f"quantize: config must be a PTQConfig; got {type(config).__name__}")
    config.validate()
    _unimplemented(config, "")
    targets = find_targets(model, config)
    if not targets:
        warnings.warn("quantize: no nn.Linear left to quantize (all skipped or none present)", RuntimeWarning)
    for name, (mod, cfg) in targets.items():
        _unimplemented(cfg, name)
        k = linear_weight(mod).shape[1]
        if cfg.weight_granularity == "per_group" and k % cfg.group_size:
            raise ValueError(f"PTQConfig.group_size={cfg.group_size} does not divide K={k} of layer {name!r}; "
                             f"use a divisor of {k}, or a layer_policies entry for this layer")
    static = {n: m for n, (m, c) in targets.items() if c.needs_calibration}
    stats = {}
    if static:
        if calib_data is None:
            raise ValueError(f"quantize: static W8A8 (act_granularity='per_tensor') needs calib_data; "
                             f"layers needing it: {list(static)[:3]}{' ...' if len(static) > 3 else ''}")
        was_training = model.training
        model.eval()
        stats = collect_input_stats(model, static, calib_data, quiet=quiet)
        model.train(was_training)
    from tqdm.auto import tqdm

    for name, (mod, cfg) in tqdm(targets.items(), desc="quantizing", unit="layer", disable=quiet):
        absmax = stats[name].absmax if name in stats else None
        set_submodule(model, name, QuantLinear.from_float(mod, cfg, name=name, input_absmax=absmax))
    model.ptqrt_config = config
    return model


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


