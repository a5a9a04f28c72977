"""Load a packed directory on its own: the model class and config from the config.json that
save_quantized wrote, without allocating the float weights.

    model = ptqrt.from_pretrained("out/")               # a transformers model, on the CPU, eval mode
    model = ptqrt.from_pretrained("out/", device="cuda")

The model is built with torch.empty making meta tensors (the weights of linears, embeddings and most
fused experts), while its buffers are computed for real, so that what the file does not hold (a rotary
inv_freq, a causal mask) comes from the model's own __init__ as usual; load_quantized then checks the
directory against it and gives every meta tensor the file's tensor itself (no second copy in memory).
"""
from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .format import FormatError, load_quantized, read_description

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"


def from_pretrained(path, device=None, verify: bool = True, attn_implementation: Optional[str] = None) -> nn.Module:
    """The quantized model saved in `path` by save_quantized, rebuilt from its config.json alone (a
    Hugging Face transformers model: the class its `architectures` names). Everything load_quantized
    checks is checked. The weights that torch.empty makes (linears, embeddings, most fused experts) are
    never allocated; a model whose __init__ cannot run that way (it computes with such a tensor, or keeps
    one as a non-persistent buffer or a plain attribute) is built on the CPU instead, with a warning.
    device: where the model goes once loaded (default: the CPU). verify: check the files' SHA-256.
    attn_implementation: as transformers takes it ("sdpa", "eager", ...; default: transformers' choice).
    Raises FileNotFoundError for a directory that is not a packed one and FormatError (a ValueError)
    for one that cannot be built from what it holds, naming the file and the reason."""
    in_dir = Path(path)
    desc = read_description(in_dir)
    config = _config(in_dir)
    cls = _model_class(config, in_dir / CONFIG)
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = _build(cls, config, _main_dtype(desc), kw, in_dir / CONFIG, desc)
    _adopt_file_dtypes(model, desc)
    load_quantized(model, in_dir, verify=verify)
    gen = in_dir / GENERATION_CONFIG
    if gen.is_file() and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(str(in_dir))
        except (OSError, ValueError) as e:
            raise FormatError(f"{gen} cannot be read ({e})") from None
    if device is not None:
        model.to(device)
    return model.eval()


def hf_config_json(model: nn.Module, quantization: Optional[dict] = None):
    """The text of config.json for `model` (None if it has no transformers config): its config, with
    `architectures` naming the model's own class, as transformers' save_pretrained writes it (a model
    built from a config says nothing there; one loaded by AutoModel may name another head), and
    `quantization_config` = `quantization` (what lets transformers' own from_pretrained load the directory,
    integrations.hf_quantizer) where given."""
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_json_string"):
        return None
    hf_config = copy.deepcopy(hf_config)
    if hasattr(hf_config, "architectures"):
        hf_config.architectures = [type(model).__name__]
    if quantization is not None:
        hf_config.quantization_config = quantization
    return hf_config.to_json_string()


def generation_config_json(model: nn.Module):
    """The text of generation_config.json for a transformers model that generates (None otherwise)."""
    gen = getattr(model, "generation_config", None)
    can = getattr(model, "can_generate", None)
    if gen is None or not hasattr(gen, "to_json_string") or not callable(can) or not can():
        return None
    return gen.to_json_string()


def _config(in_dir: Path):
    path = in_dir / CONFIG
    if not path.is_file():
        raise FormatError(f"{in_dir} has no {CONFIG}: save_quantized writes one for a Hugging Face transformers "
                          f"model only; build the model yourself and call ptqrt.load_quantized(model, {str(in_dir)!r})")
    try:
        import transformers
        from transformers import AutoConfig
    except ImportError:
        raise FormatError(f"{path} describes a transformers model, and transformers is not installed "
                          f"(pip install transformers)") from None
    try:
        return AutoConfig.from_pretrained(str(in_dir))
    except Exception as e:  # OSError, ValueError, and transformers' own validation errors
        raise FormatError(f"{path} cannot be read by transformers {transformers.__version__}: "
                          f"{type(e).__name__}: {e}") from e


def _model_class(config, path: Path):
    """The transformers class that `architectures` names (the first this transformers has)."""
    import transformers

    names = getattr(config, "architectures", None) or []
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    if not names:
        raise FormatError(f"{path} does not say which model class it is ('architectures' is empty); build the "
                          f"model yourself and call ptqrt.load_quantized(model, {str(path.parent)!r})")
    raise FormatError(f"{path}: architectures {names} name no model class of transformers "
                      f"{transformers.__version__} (a model with code of its own, or from a newer transformers); "
                      f"build the model yourself and call ptqrt.load_quantized(model, {str(path.parent)!r})")


def _main_dtype(desc: dict):
    """The float dtype that holds most of the file's float tensors' elements (None: no float tensor), the
    dtype the model is built in, as from_pretrained(dtype=...) would."""
    count: dict = {}
    for p in desc["parameters"].values():
        dt = getattr(torch, str(p.get("dtype")), None)
        if isinstance(dt, torch.dtype) and dt.is_floating_point and p["mode"] == "FLOAT":
            count[dt] = count.get(dt, 0) + math.prod(p["shape"])
    return max(count, key=count.get) if count else None


def _adopt_file_dtypes(model: nn.Module, desc: dict) -> None:
    """Give each float parameter the dtype its tensor has in the file (a model whose norms were kept in
    float32 beside bfloat16 weights); a shared parameter stays shared."""
    params = desc["parameters"]
    new: dict = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for key, p in list(mod._parameters.items()):
            if p is None or not p.is_floating_point():
                continue
            entry = params.get(f"{mname}.{key}" if mname else key)
            dt = getattr(torch, str(entry.get("dtype")), None) if entry else None
            if not isinstance(dt, torch.dtype) or not dt.is_floating_point or dt == p.dtype:
                continue
            if id(p) not in new:
                new[id(p)] = (p, nn.Parameter(p.detach().to(dt), requires_grad=p.requires_grad))
            mod._parameters[key] = new[id(p)][1]


# What parameters are made with: nn.Linear, nn.Embedding and most fused experts use torch.empty; norms,
# biases and some fused experts (Llama-4's) torch.zeros / torch.ones; a few torch.full or torch.rand(n).
FACTORIES = (torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn)


class _OnMeta(TorchFunctionMode):
    """The factories `funcs` make meta tensors while this is active (in this thread only, as torch.device's
    own context), so that what the model makes its parameters with is never allocated. Everything else (a
    rotary table's arange, the maths on it) stays real."""

    def __init__(self, funcs=FACTORIES):
        super().__init__()
        self.funcs = funcs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.funcs:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


def _build(cls, config, dtype, kw: dict, path: Path, desc: dict):
    """The model, its parameters made on the meta device: first with every factory of FACTORIES making
    meta tensors; where that breaks the model's own __init__ (it computes with such a tensor) or leaves on
    the meta device what the file cannot fill (a non-persistent buffer, a tensor kept as a plain attribute,
    one the file does not hold), again with torch.empty alone doing so (what nn.Linear and nn.Embedding
    use); where that breaks too, on the CPU, float weights and all, as load_quantized's caller would have."""
    import transformers

    def build():
        try:
            return cls._from_config(config, dtype=dtype, **kw)
        except Exception as e:  # the config's values, as transformers validates them, or the class's own code
            raise FormatError(f"{path}: transformers {transformers.__version__} cannot build {cls.__name__} from it: "
                              f"{type(e).__name__}: {e}") from e

    for funcs in (FACTORIES, (torch.empty,)):
        try:
            with _OnMeta(funcs):
                model = build()
            why = _left_on_meta(model, desc)
        except FormatError as e:
            why = f"its __init__ fails: {e.__cause__}"
        if why is None:
            return model
    model = build()  # raises FormatError if the config itself is at fault
    warnings.warn(f"ptqrt.from_pretrained: {cls.__name__} cannot be built with its weights on the meta device ({why}); "
                  f"built on the CPU instead, float weights included", RuntimeWarning)
    return model


def _left_on_meta(model: nn.Module, desc: dict) -> Optional[str]:
    """Why `model`, built with meta tensors, cannot be loaded from the file `desc` describes (None: it can):
    a meta tensor that loading would not replace."""
    held = desc["parameters"]
    quantized = desc["modules"]
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if not t.is_meta:
            continue
        owner = name.rpartition(".")[0]
        if _non_persistent(model, name):
            return f"buffer {name!r} is left on it"
        if name not in held and owner not in quantized and f"{owner}.ptqrt_experts" not in quantized:
            return f"{name!r} is left on it and the file does not hold it"
    return _meta_attribute(model)


def _meta_attribute(model: nn.Module) -> Optional[str]:
    """Why the model cannot keep a build on the meta device for a tensor that is neither a parameter nor a
    buffer (a plain attribute, or one in a list or dict attribute: the file cannot fill it, and a meta
    tensor mixed with real ones does not always raise), or None."""
    for mname, mod in model.named_modules():
        for key, v in vars(mod).items():
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else (v,)
            if any(isinstance(t, torch.Tensor) and t.is_meta for t in items):
                return f"attribute {(mname + '.' if mname else '') + key!r} is left on it"
    return None


def _non_persistent(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in model.get_submodule(owner)._non_persistent_buffers_set
