"""quantize(): calibrate -> convert -> swap modules, on any nn.Module."""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Iterable, Optional

import torch
from torch import nn

from ._eval_mode import eval_mode
from .config import PTQConfig
from .modules.linear import QuantLinear, is_quantizable, linear_weight
from .modules.weight_reads import weight_read_directly


def find_targets(model: nn.Module, config: PTQConfig) -> dict[str, tuple[nn.Module, PTQConfig]]:
    """{name: (module, layer config)} for every Linear/Conv1D not skipped (a linear registered under several
    names: its first; see _aliases). Linears that cannot be swapped (is_quantizable: an nn.Linear subclass
    with a forward of its own; weight_read_directly: a weight a containing module reads itself, under any
    of its names) are named in a warning."""
    out, kept = {}, []
    for name, mod in model.named_modules():
        if not name or config.is_skipped(name):
            continue
        if is_quantizable(mod):
            out[name] = (mod, config.for_layer(name))
        elif isinstance(mod, nn.Linear):
            kept.append(f"{name} ({type(mod).__name__})")
    every = _names(model)
    read = weight_read_directly(model, [n for name, (mod, _) in out.items() for n in every[id(mod)]])
    for name, (mod, _) in list(out.items()):
        if read & set(every[id(mod)]):
            del out[name]
            kept.append(f"{name} (weight read directly)")
    if kept:
        warnings.warn(f"quantize: {len(kept)} linears stay float: {kept[:3]}{' ...' if len(kept) > 3 else ''}"
                      f" (a forward of their own, such as an MoE router's, or a weight a module reads directly, "
                      f"as nn.MultiheadAttention's out_proj or Mamba's dt_proj)", RuntimeWarning, stacklevel=3)
    return out


def _names(model: nn.Module) -> dict[int, list[str]]:
    """{id(module): every name it is registered under, first as named_modules() gives it}."""
    out: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if name:
            out.setdefault(id(mod), []).append(name)
    return out


def find_experts(model: nn.Module, config: PTQConfig) -> dict[str, tuple[nn.Module, PTQConfig]]:
    """{name: (experts module, layer config)} for every fused-experts module of a transformers MoE model
    (3-D expert weights, see ptqrt.modules.experts) not skipped. A per-group config's group size must
    divide every projection's K."""
    from .modules.experts import expert_weights

    out = {}
    for name, mod in model.named_modules():
        weights = expert_weights(mod) if name else {}
        if not weights or config.is_skipped(name):
            continue
        cfg = config.for_layer(name)
        if cfg.weight_granularity == "per_group":
            for p, w in weights.items():
                _check_group(cfg.group_size, w.shape[2], f"{name}.{p}")
        out[name] = (mod, cfg)
    return out


def _aliases(model: nn.Module, targets: dict, config: PTQConfig) -> dict[str, list[str]]:
    """{target name: the other names the same linear is registered under}, where each of them gets the one
    QuantLinear. Names of one linear that skip or layer_policies treat differently are refused. A linear
    whose config calibrates keeps the float one under its other names, with a warning: calibration walks
    a decoder one layer at a time and would see it run in the first name's layer only; one whose parent
    module is itself registered under several names (so that swapping it under one name swaps it under
    all) is taken out of `targets` and stays float, with a warning."""
    every = _names(model)
    for names in every.values():
        if len(names) > 1 and is_quantizable(model.get_submodule(names[0])):
            skipped = {n: config.is_skipped(n) for n in names}
            if len(set(skipped.values())) > 1:
                raise ValueError(f"quantize: {names} are one linear under {len(names)} names, and skip names only "
                                 f"{[n for n, v in skipped.items() if v]}: skip all of them or none")
            if not any(skipped.values()) and any(config.for_layer(n) != config.for_layer(names[0]) for n in names):
                raise ValueError(f"quantize: {names} are one linear under {len(names)} names, and layer_policies "
                                 f"give them different configs: give all of them the same")
    out, left, kept = {}, [], []
    for name, (mod, cfg) in list(targets.items()):
        others = every[id(mod)][1:]
        if others and cfg.needs_calibration:
            owner, _, slot = name.rpartition(".")
            parent = model.get_submodule(owner)
            if any(o.rpartition(".")[2] == slot and model.get_submodule(o.rpartition(".")[0]) is parent for o in others):
                del targets[name]  # a shared parent: swapping the one name swaps them all
                kept.append(name)
            else:
                left += others
        elif others:
            out[name] = others
    if left:
        warnings.warn(f"quantize: {left[:3]}{' ...' if len(left) > 3 else ''} hold a linear quantized under another "
                      f"name with a config that calibrates; calibration sees it run under that name only, so these "
                      f"names keep the float linear", RuntimeWarning, stacklevel=3)
    if kept:
        warnings.warn(f"quantize: {kept[:3]}{' ...' if len(kept) > 3 else ''} stay float under every name: each is a "
                      f"linear of a module registered under several names (one module in several layers), and "
                      f"calibration would see it run in the first of them only", RuntimeWarning, stacklevel=3)
    return out


def _refuse_quantized(model: nn.Module) -> None:
    """quantize() takes a float model: one already quantized (its record, ptqrt_config, would no longer
    say what it holds), or a bare linear (which cannot be replaced in place), is refused."""
    from .modules.experts import QuantExperts

    done = [n or type(model).__name__ for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantExperts))]
    if done:
        raise ValueError(f"quantize: the model is already quantized ({len(done)} quantized modules, such as "
                         f"{done[0]!r}); quantize the float model, once: layer_policies give layers configs of "
                         f"their own, and skip keeps layers float")
    if is_quantizable(model):
        raise ValueError(f"quantize: the model itself is a {type(model).__name__}, which cannot be replaced in place; "
                         f"quantize a module holding it (nn.Sequential(linear)), or use "
                         f"ptqrt.QuantLinear.from_float(linear, config)")


def _check_group(group: int, k: int, name: str) -> None:
    if group and k % group:
        raise ValueError(f"PTQConfig.group_size={group} does not divide K={k} of layer {name!r}; use a divisor of "
                         f"{k}, or a layer_policies entry for this layer")


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _warn_fused_weights(model: nn.Module, config: PTQConfig) -> None:
    """Say so where weights that quantize() left float outside linears, embeddings and convolutions (MoE
    experts stored as 3-D tensors in a module other than transformers' experts modules, or as 2-D ones,
    as DBRX's), not skipped, hold a sizeable share of the model's float weights."""
    # the share of all weights, the int8 ones included (of the float ones left, any tensor would look large)
    total = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for b in model.buffers() if b.dtype == torch.int8)
    loose = {}
    for name, mod in model.named_modules():
        if (name and config.is_skipped(name)) or isinstance(mod, (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)) \
                or is_quantizable(mod) or ".parametrizations." in f".{name}.":  # a weight-normed conv's
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.dim() >= 2 and p.is_floating_point():
                loose[f"{name}.{pname}" if name else pname] = p.numel()
    n = sum(loose.values())
    if total and n >= 0.05 * total:
        some = sorted(loose, key=loose.get, reverse=True)[:3]  # the largest first
        warnings.warn(f"quantize: {100 * n / total:.0f}% of the model's weights are float tensors outside linears that "
                      f"stay float ({some}{' ...' if len(loose) > 3 else ''}): ptqrt quantizes nn.Linear and Conv1D "
                      f"modules, and the fused experts of transformers' MoE models", RuntimeWarning, stacklevel=3)


def _roll_back(model: nn.Module, targets: dict, undo: list, err: BaseException) -> None:
    """Put the float linears (still held by `targets`) back where QuantLinears replaced them, and run
    `undo` in reverse. apply_int8_kv_cache, the last step, changes nothing when it fails. A restore
    that fails itself is added to err's notes rather than hiding err."""
    failed = []
    for name, (mod, _) in targets.items():
        try:
            if model.get_submodule(name) is not mod:
                set_submodule(model, name, mod)
        except Exception as e:  # noqa: BLE001 - reported on err below
            failed.append(f"{name}: {e}")
    for restore in reversed(undo):
        try:
            restore()
        except Exception as e:  # noqa: BLE001
            failed.append(f"a folded norm: {e}")
    if failed:
        err.add_note(f"ptqrt.quantize failed part way, and {len(failed)} of its changes could not be undone "
                     f"({failed[0]}{' ...' if len(failed) > 1 else ''}); reload the model")
    else:
        err.add_note("ptqrt.quantize failed part way; the model was put back as it was before the call")


@torch.no_grad()
def quantize(model: nn.Module, config: PTQConfig, calib_data: Optional[Iterable] = None, *,
             quiet: bool = False, device=None) -> nn.Module:
    """Quantize `model` in place with `config` and return it.

    Every nn.Linear (and GPT-2 Conv1D) whose name is not in config.skip becomes a QuantLinear with the
    config of the first matching layer policy; the fused experts of transformers' MoE models get a
    QuantExperts (see find_experts), calibrated expert by expert where the config calibrates.
    calib_data is an iterable of model inputs (a tensor, a tuple of positional args, or a dict of
    keyword args), needed for static W8A8, smoothing and GPTQ; None otherwise.
    A single tensor or mapping (a dict, a tokenizer's BatchEncoding) is one input.
    Device and dtype of every layer are kept. Whatever can be checked without running the model (the
    config, group sizes, calibration data given where needed, the int8 KV cache's prerequisites) is
    checked before the model is changed. An error (or KeyboardInterrupt) part way puts the model back
    as it was: the float linears, any norm that smoothing folded into, the experts' float weights.

    With calibration (static W8A8, smooth/osl, gptq), decoder models are done one layer at a time:
    pass device="cuda" to run each layer there while the rest of the model stays where it is.
    kv_cache_dtype="int8" (Hugging Face models) makes generate() use ptqrt's int8 paged KV cache.
    quiet=True hides the progress bars.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize: model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(config, PTQConfig):
        raise TypeError(f"quantize: config must be a PTQConfig; got {type(config).__name__}")
    config.validate()
    _refuse_quantized(model)
    targets = find_targets(model, config)
    aliases = _aliases(model, targets, config)
    experts = find_experts(model, config)
    if not targets and not experts:
        warnings.warn("quantize: no nn.Linear left to quantize (all skipped or none present)", RuntimeWarning)
    for name, (mod, cfg) in targets.items():
        if cfg.weight_granularity == "per_group":
            _check_group(cfg.group_size, linear_weight(mod).shape[1], name)
    needs = {n: t for n, t in targets.items() if t[1].needs_calibration}
    experts_needs = {n: t for n, t in experts.items() if t[1].needs_calibration}
    kv_static = config.kv_needs_calibration
    if (needs or experts_needs or kv_static) and calib_data is None:
        need = list(needs) + list(experts_needs)
        what = need[:3] or ["the int8 KV cache (kv_granularity='per_channel')"]
        raise ValueError(f"quantize: calibration is needed (static W8A8, outliers, gptq or a static KV cache) "
                         f"but calib_data is None; needing it: {what}{' ...' if len(need) > 3 else ''}")
    if config.kv_cache_dtype == "int8":
        from .integrations import hf

        hf.check_int8_kv_cache(model, "ptqrt.quantize with kv_cache_dtype='int8'")
    if isinstance(calib_data, (torch.Tensor, Mapping)):
        calib_data = [calib_data]  # one input; a Mapping (BatchEncoding is no dict) is not iterated
    elif calib_data is not None and not isinstance(calib_data, (list, tuple)):
        calib_data = list(calib_data)  # a generator is consumed more than once below
    if (needs or experts_needs or kv_static) and not calib_data:
        raise ValueError("quantize: calib_data is empty: calibration needs at least one sample")
    undo: list = []  # restoring functions for what is changed in place (norms folded into, experts)
    with eval_mode(model):  # each module's own training flag back afterwards
        try:
            if needs or experts_needs:
                from .layerwise import calibrate_and_quantize

                calibrate_and_quantize(model, needs, calib_data, quiet=quiet, device=device, undo=undo,
                                       experts=experts_needs)
            from tqdm.auto import tqdm

            rest = {n: t for n, t in targets.items() if n not in needs}
            for name, (mod, cfg) in tqdm(rest.items(), desc="quantizing", unit="layer", disable=quiet or not rest):
                set_submodule(model, name, QuantLinear.from_float(mod, cfg, name=name))
            rest_experts = {n: t for n, t in experts.items() if n not in experts_needs}
            if rest_experts:
                from .integrations import hf_experts
                from .modules.experts import QuantExperts

                for name, (mod, cfg) in tqdm(rest_experts.items(), desc="quantizing experts", unit="layer",
                                             disable=quiet):
                    group = cfg.weight_group
                    old = hf_experts.attach(mod, QuantExperts.from_float(mod, cfg.mode, group))
                    undo.append(lambda mod=mod, old=old: hf_experts.detach(mod, old))
            for name, others in aliases.items():  # a linear registered under several names: one QuantLinear
                for other in others:
                    set_submodule(model, other, model.get_submodule(name))
            if config.kv_cache_dtype == "int8":
                from .integrations import hf

                hf.apply_int8_kv_cache(model, config.kv_granularity, calib_data if kv_static else None, quiet=quiet)
        except BaseException as e:  # an error or an interrupt part way: the model goes back as it was
            _roll_back(model, {**targets, **{o: targets[n] for n, others in aliases.items() for o in others}}, undo, e)
            raise
    _warn_fused_weights(model, config)
    model.ptqrt_config = config
    from .integrations.hf_quantizer import record

    record(model)  # its own save_pretrained then writes what transformers' from_pretrained loads
    return model

