"""dequantize(): a quantized model back to float modules (transformers' ``model.dequantize()`` runs it).

Each QuantLinear becomes an nn.Linear whose weight is its int8 weight times its scales (smoothing factors
divided back out), so the float model computes what the int8 weights hold, without the activation
quantization of the W8A8 modes; smoothing folded into a norm stays folded (the norm and the weight
compensate each other, as they did in the quantized model). Each QuantExperts gives its experts module
float 3-D projections again and its own forward back. The int8 KV cache is removed, and with it every
record of the quantization (``ptqrt_config``, a transformers model's ``quantization_config``), so the
model saves and loads as a float model. A quantized output layer that was tied to the input embedding
stays untied: it holds its own int8 weights, which smoothing folded into the final norm may have
scaled, so the embedding cannot stand in for it.
"""
from __future__ import annotations

import copy
import types
import warnings
from typing import Optional

import torch
from torch import nn

from .modules.experts import QuantExperts, dense, transposed
from .modules.kv_cache import KVCacheQuant
from .modules.linear import QuantLinear
from .reference import dequantize_weight


@torch.no_grad()
def dequantize(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace, in place, every quantized module of `model` by float modules, and return the model.

    dtype: of the new float weights (and biases); by default a linear's bias dtype, else the dtype of
    the model's first float parameter, else float32. A linear registered under several names becomes
    one nn.Linear under all of them. transformers models anywhere in `model` (it may wrap one) get their
    own classes' Conv1D layers back, and a tie into a quantized layer is dropped from their tie records.
    dtype may also be named ("bfloat16"), as transformers' configs name it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"dequantize: model must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dequantize: dtype must be a floating torch.dtype; got {dtype!r}")
    if isinstance(model, (QuantLinear, QuantExperts)):
        raise ValueError(f"dequantize: the model itself is a {type(model).__name__}, which cannot be replaced in "
                         f"place; dequantize a module holding it")
    default = dtype or _float_dtype(model)
    hf_models = _hf_models(model)
    for _, hf_model in hf_models:
        if any(isinstance(m, KVCacheQuant) for m in hf_model.modules()):
            from .integrations import hf

            hf.remove_int8_kv_cache(hf_model)
    made: dict = {}
    # Names only: each QuantLinear is freed once replaced under all its names, so the int8 and the float
    # weights of the whole model are never held at once.
    quantized = [n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, QuantLinear)]
    conv1d = _conv1d_names(hf_models) if quantized else set()
    for name in quantized:
        mod = model.get_submodule(name)
        if not isinstance(mod, QuantLinear):
            continue  # replaced already under another name (a parent registered under several)
        if id(mod) not in made:
            made[id(mod)] = _linear(mod, dtype or (mod.bias.dtype if mod.bias is not None else default),
                                    name in conv1d)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, made[id(mod)])
        del mod
    pick = next((m.get_correct_experts_implementation for _, m in hf_models), None)
    for mod in list(model.modules()):
        q = mod._modules.get("ptqrt_experts")
        if isinstance(q, QuantExperts):
            _float_experts(mod, q, default, pick)
    _untie(hf_models, set(quantized))
    _forget(model)
    return model


def _hf_models(model: nn.Module) -> list:
    """[(name, module)] of the outermost transformers models in `model` (itself, or those it wraps)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    out = []
    for name, m in model.named_modules():
        if isinstance(m, PreTrainedModel) and not any(name.startswith(f"{n}.") or not n for n, _ in out):
            out.append((name, m))
    return out


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _conv1d_names(hf_models: list) -> set:
    """Names of the modules that transformers builds as Conv1D (GPT-2's, [K, N] weights) in the classes of
    `hf_models` (_hf_models): a QuantLinear there becomes a Conv1D again, so that the float model saves
    and loads as its class does. Each class is built on the meta device from its config (no memory)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return set()
    out = set()
    for prefix, hf_model in hf_models:
        try:
            with torch.device("meta"):
                skeleton = type(hf_model)(copy.deepcopy(hf_model.config))
        except Exception as e:  # noqa: BLE001 - a class that cannot be built from its config alone
            warnings.warn(f"dequantize: {type(hf_model).__name__} could not be built from its config "
                          f"({type(e).__name__}: {e}), so any Conv1D layer of it comes back as an nn.Linear",
                          RuntimeWarning, stacklevel=3)
            continue
        out |= {f"{prefix}.{n}" if prefix else n for n, m in skeleton.named_modules(remove_duplicate=False)
                if isinstance(m, Conv1D)}
    return out


def _linear(q: QuantLinear, dtype: torch.dtype, conv1d: bool) -> nn.Module:
    w = q.dequantized_weight().to(dtype)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        with torch.device("meta"):
            out = Conv1D(q.out_features, q.in_features)
        out.weight = nn.Parameter(w.t().contiguous())
        out.bias = nn.Parameter(q.bias.detach().to(dtype) if q.bias is not None else
                                torch.zeros(q.out_features, dtype=dtype, device=w.device))
    else:
        out = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        out.weight = nn.Parameter(w)
        if q.bias is not None:
            out.bias = nn.Parameter(q.bias.detach().to(dtype))
    out.train(q.training)
    return out


def _float_experts(module: nn.Module, q: QuantExperts, dtype: torch.dtype, pick) -> None:
    """Float [E, N, K] projections (or [E, K, N] where the module stores them so) from `q`, in place of it."""
    from .integrations import hf_experts

    weights = {}
    e, g = q.num_experts, q.group_size
    for p, (n, k) in q.shapes.items():  # every expert's rows as one [E * N, K] weight
        w = dequantize_weight(getattr(q, p).reshape(e * n, k), getattr(q, f"{p}_scale").reshape(e * n, -1),
                              g).reshape(e, n, k)
        if q.smooth:
            w = w / getattr(q, f"{p}_smooth_scale")[:, None, :]
        if transposed(module):
            w = w.transpose(1, 2)
        weights[p] = nn.Parameter(w.contiguous().to(dtype))
    del module._modules[hf_experts.CHILD]
    for p, w in weights.items():
        module._parameters[p] = w
    if dense(module):
        if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__:
            module._old_forward = types.MethodType(type(module).forward, module)  # what accelerate's hook runs
        else:
            module.__dict__.pop("forward", None)
    elif getattr(module.config, "_experts_implementation_internal", None) == hf_experts.IMPL:
        # transformers' default (pick: a model's get_correct_experts_implementation); the one before
        # quantize() is not recorded (a loaded model never had one)
        module.config._experts_implementation_internal = pick(None) if pick is not None else "eager"


def _untie(hf_models: list, quantized: set) -> None:
    """Drop from the transformers models' tie records (all_tied_weights_keys) each tie whose target or
    source is a quantized module's parameter (names in `quantized`), so that save_pretrained writes both
    tensors; from_pretrained then finds them different and leaves them untied, with a warning of its own.
    The config's tie_word_embeddings stays as it is: it also ties float embeddings (BART's encoder and
    decoder to the shared one), and some forwards read it (Switch Transformers scales its output by it)."""
    for prefix, hf_model in hf_models:
        if not hasattr(hf_model, "get_expanded_tied_weights_keys"):
            continue
        names = {n[len(prefix) + 1:] if prefix else n for n in quantized if not prefix or n.startswith(f"{prefix}.")}
        ties = hf_model.get_expanded_tied_weights_keys(all_submodels=True)
        broken = {t for t, src in ties.items() if {t.rpartition(".")[0], src.rpartition(".")[0]} & names}
        kept = getattr(hf_model, "all_tied_weights_keys", None)
        if broken and kept:
            hf_model.all_tied_weights_keys = {t: src for t, src in kept.items() if t not in broken}


def _forget(model: nn.Module) -> None:
    """Drop ptqrt's records of the quantization from `model` and its submodules (and transformers' of a
    "ptqrt" model: each sub-model's config, as T5's stacks have copies of it)."""
    for m in model.modules():
        m.__dict__.pop("ptqrt_config", None)
        config = getattr(m, "config", None)
        qc = getattr(config, "quantization_config", None)
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        if method != "ptqrt":
            continue
        del config.quantization_config
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False
        for key in ("hf_quantizer", "quantization_method", "_weight_conversions"):
            m.__dict__.pop(key, None)
        if "is_quantized" in m.__dict__ or hasattr(type(m), "is_quantized"):
            m.is_quantized = False


__all__ = ["dequantize"]
