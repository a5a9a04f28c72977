"""Load a packed directory on its own: the model class and config from the config.json that
save_quantized wrote, the float weights never allocated.

    model = ptqrt.from_pretrained("out/")               # a transformers model, on the CPU, eval mode
    model = ptqrt.from_pretrained("out/", device="cuda")

The model is built with its parameters on the meta device and its buffers real, so that what the file
does not hold (a rotary inv_freq, a causal mask) is computed by the model's own __init__ as usual;
load_quantized then checks the directory against it and gives every parameter the file's tensor
itself (no second copy in memory).
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .format import FormatError, load_quantized, read_description

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"


def from_pretrained(path, device=None, verify: bool = True, attn_implementation: Optional[str] = None) -> nn.Module:
    """The quantized model saved in `path` by save_quantized, rebuilt from its config.json alone (a
    Hugging Face transformers model: the class its `architectures` names). Everything load_quantized
    checks is checked, and nothing is allocated for the float weights that the int8 ones replace.
    device: where the model goes once loaded (default: the CPU). verify: check the files' SHA-256.
    attn_implementation: as transformers takes it ("sdpa", "eager", ...; default: transformers' choice).
    Raises FileNotFoundError for a directory that is not a packed one and FormatError (a ValueError)
    for one that cannot be built from what it holds, naming the file and the reason."""
    in_dir = Path(path)
    desc = read_description(in_dir)
    config = _config(in_dir)
    cls = _model_class(config, in_dir / CONFIG)
    with _parameters_on_meta():
        kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        model = cls._from_config(config, dtype=_main_dtype(desc), **kw)
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


def hf_config_json(model: nn.Module):
    """The text of config.json for `model` (None if it has no transformers config): its config, with
    `architectures` naming the model's own class, as transformers' save_pretrained writes it (a model
    built from a config says nothing there; one loaded by AutoModel may name another head)."""
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_json_string"):
        return None
    if hasattr(hf_config, "architectures") and hf_config.architectures != [type(model).__name__]:
        hf_config = copy.deepcopy(hf_config)
        hf_config.architectures = [type(model).__name__]
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
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(f"{path} cannot be read by transformers {transformers.__version__}: {e}") from None


def _model_class(config, path: Path):
    """The transformers class that `architectures` names (the first this transformers has)."""
    import transformers

    names = list(getattr(config, "architectures", None) or [])
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
            n = 1
            for s in p["shape"]:
                n *= s
            count[dt] = count.get(dt, 0) + n
    return max(count, key=count.get) if count else None


def _adopt_file_dtypes(model: nn.Module, desc: dict) -> None:
    """Give each float parameter still on the meta device the dtype its tensor has in the file (a model
    whose norms were kept in float32 beside bfloat16 weights); a shared parameter stays shared."""
    params = desc["parameters"]
    new: dict = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for key, p in list(mod._parameters.items()):
            if p is None or not p.is_meta or not p.is_floating_point():
                continue
            entry = params.get(f"{mname}.{key}" if mname else key)
            dt = getattr(torch, str(entry.get("dtype")), None) if entry else None
            if not isinstance(dt, torch.dtype) or not dt.is_floating_point or dt == p.dtype:
                continue
            if id(p) not in new:
                new[id(p)] = (p, nn.Parameter(torch.empty_like(p, dtype=dt), requires_grad=p.requires_grad))
            mod._parameters[key] = new[id(p)][1]


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter a module registers while this is active is moved to the meta device at once (its
    storage, allocated by torch.empty and never touched, is freed); buffers stay where they were made.
    Models initialise their parameters after registering them, so the initialisation costs nothing."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and not p.is_meta:
            module._parameters[name] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original
