"""The packed format: quantized state <-> safetensors + quantization_description.json.

A packed directory holds
  model.safetensors                      every tensor of the model's state dict (sharded past
                                         max_shard_size into model-0000i-of-0000n.safetensors with
                                         model.safetensors.index.json, as Hugging Face does)
  quantization_description.json          format version, ptqrt version, the PTQConfig, per quantized
                                         module its mode and shapes, per tensor one of FLOAT, W8A16,
                                         W8A8, W8A8_DYNAMIC, C8, tied-tensor aliases, file checksums
  config.json                            the model's own config, when it has one
The description is written last, so a directory whose save was interrupted is refused on load.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

FORMAT_NAME = "ptqrt"
FORMAT_VERSION = 1
DESCRIPTION = "quantization_description.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD = 4 * 1024**3
MODULE_KINDS = ("linear", "kv_cache", "experts")  # what the "kind" of a module entry may be (absent: linear)


class FormatError(ValueError):
    """A packed directory that is damaged, of another version, or does not fit the model."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _version() -> str:
    from . import __version__
    return __version__


def _modes(model: nn.Module, names: list[str]) -> tuple[dict, dict]:
    """(per-module description, per-tensor mode) for the model's state dict names."""
    from .modules.experts import QuantExperts
    from .modules.kv_cache import KVCacheQuant
    from .modules.linear import QuantLinear

    modules = {n: m.describe() for n, m in model.named_modules(remove_duplicate=False)  # every name of a shared one
               if isinstance(m, (QuantLinear, KVCacheQuant, QuantExperts))}
    modes = {}
    for t in names:
        owner, _, leaf = t.rpartition(".")
        if owner in modules and modules[owner].get("kind") == "kv_cache":
            modes[t] = "C8"  # calibrated int8 KV-cache scales
        elif owner in modules:
            modes[t] = modules[owner]["mode"]
        else:
            modes[t] = "FLOAT"
    return modules, modes


def _dedup(state: dict, tied_targets=()) -> tuple[dict, dict]:
    """Tied tensors share storage; safetensors refuses that. Keep one name, record the others. The name
    kept is a tie's source (the input embedding), not its targets (`tied_targets`: lm_head), as
    transformers saves it: a base model loaded from the directory by transformers finds its embedding."""
    seen, unique, aliases = {}, {}, {}
    for name in sorted(state, key=lambda n: (n in tied_targets, n)):
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
        else:
            if key is not None:
                seen[key] = name
            unique[name] = t.detach().contiguous().cpu()
    return unique, aliases


def _shards(tensors: dict, max_bytes: int) -> list[dict]:
    shards, cur, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += nbytes
    shards.append(cur)
    return shards


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_quantized(model: nn.Module, out_dir, max_shard_size: int = DEFAULT_SHARD) -> Path:
    """Write `model` (after quantize()) to `out_dir`; returns the directory. Every tensor of the state
    dict is saved, so load_quantized can rebuild the model from its architecture alone."""
    from safetensors.torch import save_file

    from .modules.linear import QuantLinear

    config = getattr(model, "ptqrt_config", None)
    if config is None and not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("save_quantized: the model holds no QuantLinear; call ptqrt.quantize(model, config) first")
    if max_shard_size <= 0:
        raise ValueError(f"save_quantized: max_shard_size must be positive; got {max_shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / DESCRIPTION).unlink(missing_ok=True)  # until the new one is written, the folder is incomplete
    state = model.state_dict()
    tensors, aliases = _dedup(state, set(getattr(model, "all_tied_weights_keys", None) or ()))
    modules, modes = _modes(model, list(state))
    shards = _shards(tensors, max_shard_size)
    files = {}
    if len(shards) == 1:
        _atomic_write(out / SINGLE, lambda p: save_file(shards[0], str(p), metadata={"format": "pt"}))
        files[SINGLE] = _sha256(out / SINGLE)
        (out / INDEX).unlink(missing_ok=True)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_write(out / fname, lambda p, s=shard: save_file(s, str(p), metadata={"format": "pt"}))
            files[fname] = _sha256(out / fname)
            weight_map.update({n: fname for n in shard})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": weight_map}
        _atomic_write(out / INDEX, lambda p: p.write_text(json.dumps(index, indent=1)))
        (out / SINGLE).unlink(missing_ok=True)
    from .integrations.hf_quantizer import quantization_config
    from .pretrained import generation_config_json, hf_config_json

    qc = quantization_config({"format_version": FORMAT_VERSION, "modules": modules,
                              "config": config.to_dict() if config is not None else None})
    for fname, text in (("config.json", hf_config_json(model, qc)),
                        ("generation_config.json", generation_config_json(model))):
        if text is not None:
            _atomic_write(out / fname, lambda p, t=text: p.write_text(t))
        else:  # one left by an earlier save of another model would describe that model
            (out / fname).unlink(missing_ok=True)
    desc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "ptqrt_version": _version(),
        "torch_version": torch.__version__,
        "config": config.to_dict() if config is not None else None,
        "modules": modules,
        "parameters": {n: {"mode": modes[n], "dtype": str(state[n].dtype).replace("torch.", ""),
                           "shape": list(state[n].shape)} for n in sorted(state)},
        "aliases": aliases,
        "files": files,
    }
    _atomic_write(out / DESCRIPTION, lambda p: p.write_text(json.dumps(desc, indent=1)))
    return out


def _saved_by_transformers(in_dir: Path) -> bool:
    """Whether `in_dir` holds a config.json naming the 'ptqrt' quantization method (save_pretrained's)."""
    try:
        qc = json.loads((in_dir / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "ptqrt"


def read_description(in_dir) -> dict:
    path = Path(in_dir) / DESCRIPTION
    if not path.is_file():
        if _saved_by_transformers(Path(in_dir)):
            raise FileNotFoundError(f"{path} is missing: {in_dir} was written by transformers' save_pretrained (its "
                                    f"config.json names the 'ptqrt' quantization method): load it with transformers' "
                                    f"from_pretrained (import ptqrt first), and save_quantized that to make a packed "
                                    f"directory")
        raise FileNotFoundError(f"{path} is missing: {in_dir} is not a ptqrt packed directory "
                                f"(or its save did not finish)")
    try:
        desc = json.loads(path.read_text())
    except ValueError as e:
        raise FormatError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(desc, dict):
        raise FormatError(f"{path}: expected a JSON object; got {type(desc).__name__}")
    if desc.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: format is {desc.get('format')!r}, expected {FORMAT_NAME!r}")
    if desc.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{path}: format_version {desc.get('format_version')!r} is not supported by this "
                          f"ptqrt ({_version()}), which reads version {FORMAT_VERSION}")
    for key in ("modules", "parameters", "files"):
        if not isinstance(desc.get(key), dict):
            raise FormatError(f"{path}: the {key!r} section is missing or damaged")
    for key in ("files", "aliases"):
        section = desc.get(key, {})
        if not isinstance(section, dict) or not all(isinstance(v, str) for v in section.values()):
            raise FormatError(f"{path}: the {key!r} section is damaged: expected {{name: string}}; "
                              f"got {section!r:.200}")
    for fname in desc["files"]:
        if not _plain_file_name(fname):
            raise FormatError(f"{path}: the 'files' section is damaged: {fname!r} is not the name of a file in "
                              f"{in_dir} (it is a path, '.', '..' or empty): refused, so that nothing outside {in_dir} is read")
    if desc.get("config") is not None and not isinstance(desc["config"], dict):
        raise FormatError(f"{path}: the 'config' section is damaged: expected a dict of PTQConfig fields; got "
                          f"{type(desc['config']).__name__}")
    for name, p in desc["parameters"].items():
        if not isinstance(p, dict) or not isinstance(p.get("mode"), str) or not _is_shape(p.get("shape")):
            raise FormatError(f"{path}: the entry of tensor {name!r} in 'parameters' is damaged: expected "
                              f"{{'mode': str, 'dtype': str, 'shape': [ints]}}; got {p!r:.200}")
    for name, d in desc["modules"].items():
        _check_module_entry(name, d, path)
    return desc


def _plain_file_name(name: str) -> bool:
    """A file of the packed directory itself: no directory part (so no absolute path, no '../x'), not '.' / '..'.
    A symlink of that name is a file of the directory too (a Hugging Face cache's snapshot holds those)."""
    return name not in ("", ".", "..") and not any(c in name for c in ("/", "\\", "\0"))


def _is_shape(v) -> bool:
    return isinstance(v, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _positive(v) -> bool:
    return _count(v) and v > 0


def _flag(v) -> bool:
    return isinstance(v, bool)


def _entry_fields(kind: str) -> dict:
    """{field: (check, what it must be)} of a module entry of `kind` (what describe() writes)."""
    from .modules.kv_cache import GRANULARITIES
    from .modules.linear import MODES

    if kind == "linear":
        return {"mode": (lambda v: v in MODES, f"one of {MODES}"), "in_features": (_positive, "a positive int"),
                "out_features": (_positive, "a positive int"), "group_size": (_count, "a non-negative int"),
                "bias": (_flag, "true or false"), "has_smooth": (_flag, "true or false")}
    if kind == "experts":
        from .modules.experts import MODES as EXPERT_MODES, PROJECTIONS

        def projections(v) -> bool:
            return isinstance(v, dict) and bool(v) and all(
                p in PROJECTIONS and isinstance(s, list) and len(s) == 2 and all(_positive(n) for n in s)
                for p, s in v.items())
        return {"mode": (lambda v: v in EXPERT_MODES, f"one of {EXPERT_MODES}"),
                "group_size": (_count, "a non-negative int"), "num_experts": (_positive, "a positive int"),
                "projections": (projections, f"{{name: [N, K]}} with names from {PROJECTIONS}")}
    return {"granularity": (lambda v: v in GRANULARITIES, f"one of {GRANULARITIES}"),
            "num_kv_heads": (_positive, "a positive int"), "head_dim": (_positive, "a positive int"),
            "layer_idx": (_count, "a non-negative int")}


def _float_dtype(name) -> Optional[torch.dtype]:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else None


def _check_module_entry(name: str, d, path: Path) -> None:
    """Refuse a damaged entry of the 'modules' section (what QuantLinear / KVCacheQuant.describe()
    wrote) before anything is built from it."""
    if not isinstance(d, dict):
        raise FormatError(f"{path}: the entry of module {name!r} is damaged: expected a dict; got {d!r:.200}")
    kind = d.get("kind", "linear")
    if kind not in MODULE_KINDS:
        raise FormatError(f"{path}: module {name!r} has kind {kind!r}, which this ptqrt does not know "
                          f"(known: {', '.join(MODULE_KINDS)})")
    for field, (ok, what) in _entry_fields(kind).items():
        if field not in d:
            raise FormatError(f"{path}: the entry of module {name!r} is damaged: {field!r} is missing")
        if not ok(d[field]):
            raise FormatError(f"{path}: the entry of module {name!r} is damaged: {field} must be {what}; "
                              f"got {d[field]!r}")
    if kind == "experts" and not _flag(d.get("smooth", False)):  # absent in files written before smoothing
        raise FormatError(f"{path}: the entry of module {name!r} is damaged: smooth must be true or false; "
                          f"got {d['smooth']!r}")
    if kind == "linear" and d["bias"] and _float_dtype(d.get("bias_dtype")) is None:
        raise FormatError(f"{path}: the entry of module {name!r} is damaged: bias_dtype must name a torch float "
                          f"dtype (e.g. 'float32', 'bfloat16'); got {d.get('bias_dtype')!r}")


def read_tensors(in_dir, desc: dict, verify: bool = True) -> dict:
    """Every tensor of the packed directory, checked against the recorded checksums; the description's
    aliases are checked against them (not added: load_quantized gives each alias its target's tensor)."""
    from safetensors.torch import load_file

    return _each_file(Path(in_dir), desc, lambda path: load_file(str(path)), verify)


def _each_file(in_dir: Path, desc: dict, read, verify: bool) -> dict:
    """{name: what read(path) gives for it} over the files of the description, each checked (present, its
    checksum where verify, readable, no name in two files), and the aliases checked against the names."""
    from safetensors import SafetensorError

    out: dict = {}
    for fname, digest in desc["files"].items():
        path = in_dir / fname
        if not path.is_file():
            raise FormatError(f"{path} is missing (listed in {DESCRIPTION})")
        if verify and _sha256(path) != digest:
            raise FormatError(f"{path} is damaged or truncated: its checksum differs from the one recorded "
                              f"in {DESCRIPTION}")
        try:
            part = read(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise FormatError(f"{path} cannot be read ({e})") from None
        for name in part:
            if name in out:
                raise FormatError(f"tensor {name!r} appears in two files ({path})")
        out.update(part)
    _check_aliases(desc, set(out), in_dir / DESCRIPTION)
    return out


def _check_aliases(desc: dict, stored: set, path: Path) -> None:
    """Each alias (a tied tensor saved once) names a tensor no file holds and points to one a file holds: an
    alias over a stored tensor would silently replace it, and one pointing to another alias depends on the
    order of the section."""
    aliases = desc.get("aliases", {})
    for alias, target in aliases.items():
        if alias in stored:
            raise FormatError(f"{path}: the 'aliases' section is damaged: alias {alias!r} -> {target!r} names a "
                              f"tensor the files hold (it would replace that tensor by {target!r})")
        if target in aliases:
            raise FormatError(f"{path}: the 'aliases' section is damaged: alias {alias!r} points to {target!r}, "
                              f"which is itself an alias (expected a tensor the files hold)")
        if target not in stored:
            raise FormatError(f"{path}: alias {alias!r} points to {target!r}, which no file holds")


def _expected_module(model: nn.Module, name: str, d: dict, path: Path) -> None:
    from .modules.linear import is_quantizable, linear_weight

    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise FormatError(f"{path}: module {name!r} is quantized in the file but the model has no such "
                          f"module (is this the right architecture?)") from None
    if not is_quantizable(mod):
        raise FormatError(f"{path}: module {name!r} is {type(mod).__name__} in the model, expected a Linear")
    n, k = linear_weight(mod).shape
    if (n, k) != (d["out_features"], d["in_features"]):
        raise FormatError(f"{path}: module {name!r} is [out={n}, in={k}] in the model but "
                          f"[{d['out_features']}, {d['in_features']}] in the file")


def load_quantized(float_model: nn.Module, in_dir, verify: bool = True) -> nn.Module:
    """Rebuild a quantized model from `float_model` (its architecture; its weights are replaced) and the
    packed directory `in_dir`. Everything is checked before the model is touched: a damaged, truncated
    or mismatched directory, a config this ptqrt cannot read, or a model that cannot take the file's
    int8 KV cache raises FormatError (or FileNotFoundError) naming the tensor, module or file, and
    leaves float_model as it was. Returns the model (changed in place), on the device it was on; a
    model built on the meta device (to skip allocating the float weights) gets its tensors on the CPU.
    """
    from .modules.experts import QuantExperts
    from .modules.kv_cache import KVCacheQuant
    from .modules.linear import QuantLinear
    from .quantize import set_submodule

    in_dir = Path(in_dir)
    desc = read_description(in_dir)
    path = in_dir / DESCRIPTION
    config = _read_config(desc, path)
    qmods = {n: d for n, d in desc["modules"].items() if d.get("kind", "linear") == "linear"}
    kvmods = {n: d for n, d in desc["modules"].items() if d.get("kind") == "kv_cache"}
    exmods = {n: d for n, d in desc["modules"].items() if d.get("kind") == "experts"}
    for name, d in qmods.items():
        _expected_module(float_model, name, d, path)
    replaced = {f"{n.rpartition('.')[0]}.{p}" for n, d in exmods.items() for p in d["projections"]}
    parents = [n.rpartition(".")[0] for n in exmods]
    for name, d in exmods.items():
        if name.rpartition(".")[2] != "ptqrt_experts" or parents.count(name.rpartition(".")[0]) > 1:
            raise FormatError(f"{path}: experts entry {name!r} is not the one 'ptqrt_experts' child of an experts "
                              f"module")
        _expected_experts(float_model, name, d, path)
    if kvmods:
        _check_kv_cache(float_model, kvmods, path)
    # The modules the model will hold once swapped, built aside on the meta device: they give every
    # expected name, shape and dtype (and refuse an entry whose fields contradict each other).
    try:
        swapped = {n: QuantLinear.from_description(d, n, device="meta") for n, d in qmods.items()}
        swapped.update({n: KVCacheQuant.from_description(d, device="meta") for n, d in kvmods.items()})
        swapped.update({n: QuantExperts.from_description(d, device="meta") for n, d in exmods.items()})
    except ValueError as e:
        raise FormatError(f"{path}: a module entry is damaged ({e})") from None
    tensors = read_tensors(in_dir, desc, verify)  # its aliases checked: each points to a stored tensor
    for alias, target in desc.get("aliases", {}).items():
        tensors[alias] = tensors[target]

    expected = {}
    for name, t in float_model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in swapped or name in replaced:
            continue
        expected[name] = t
    for mname, qm in swapped.items():
        for leaf, t in qm.state_dict().items():
            expected[f"{mname}.{leaf}"] = t
    for name, t in expected.items():
        if name not in tensors:
            raise FormatError(f"tensor {name!r} is missing from {in_dir} (files: {', '.join(desc['files'])})")
        got = tensors[name]
        where = _file_of(desc, name, in_dir)
        if tuple(got.shape) != tuple(t.shape):
            raise FormatError(f"tensor {name!r} in {where} has shape {tuple(got.shape)}; the model expects "
                              f"{tuple(t.shape)}")
        if got.dtype != t.dtype:
            raise FormatError(f"tensor {name!r} in {where} has dtype {got.dtype}; the model expects {t.dtype}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise FormatError(f"{in_dir} holds tensors the model has no place for: {unexpected[:5]}"
                          f"{' ...' if len(unexpected) > 5 else ''} (first in {_file_of(desc, unexpected[0], in_dir)})")
    _check_meta_tensors(float_model, swapped, expected, in_dir, replaced)
    _check_scales(swapped, tensors, desc, in_dir)

    # All checks passed: now change the model.
    made: dict = {}  # a linear registered under several names gets one QuantLinear, as quantize() gave it
    for name, d in qmods.items():
        old = float_model.get_submodule(name)
        if id(old) not in made:
            dev = next(iter(list(old.parameters()) + list(old.buffers())), torch.empty(0)).device
            made[id(old)] = QuantLinear.from_description(d, name, device=dev)
        set_submodule(float_model, name, made[id(old)])
    for name, d in kvmods.items():
        parent = float_model.get_submodule(name.rpartition(".")[0])
        dev = next(iter(list(parent.parameters()) + list(parent.buffers())), torch.empty(0)).device
        set_submodule(float_model, name, KVCacheQuant.from_description(d, device=dev))
    if exmods:
        from .integrations import hf_experts

        for name, d in exmods.items():
            parent = float_model.get_submodule(name.rpartition(".")[0])
            dev = next(iter(list(parent.parameters()) + list(parent.buffers())), torch.empty(0)).device
            hf_experts.attach(parent, QuantExperts.from_description(d, device=dev))
    # On the meta device now: what the model was built with there, and the modules swapped in beside it.
    on_meta = any(t.is_meta for t in list(float_model.parameters()) + list(float_model.buffers()))
    taken = _materialize(float_model, tensors) if on_meta else set()
    rest = {n: tensors[n] for n in float_model.state_dict() if n not in taken}
    result = float_model.load_state_dict(rest, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - taken:  # checked above: cannot happen
        raise RuntimeError(f"load_quantized: state dict mismatch after the checks: {result}")
    if kvmods:
        from .integrations import hf

        hf.reattach(float_model)
    if config is not None:
        float_model.ptqrt_config = config
    from .integrations.hf_quantizer import record

    record(float_model)
    return float_model


def _expected_experts(model: nn.Module, name: str, d: dict, path: Path) -> None:
    """The file's QuantExperts `name` (<experts module>.ptqrt_experts) fits the model's experts module."""
    from .modules.experts import fused_projections, transposed

    parent_name = name.rpartition(".")[0]
    try:
        mod = model.get_submodule(parent_name)
    except AttributeError:
        raise FormatError(f"{path}: experts {parent_name!r} are quantized in the file but the model has no such "
                          f"module (is this the right architecture?)") from None
    have = fused_projections(mod)
    if sorted(have) != sorted(d["projections"]):
        raise FormatError(f"{path}: {parent_name!r} is {type(mod).__name__} with fused projections {have} in the model; "
                          f"the file has {sorted(d['projections'])}")
    for p, (n, k) in d["projections"].items():
        w = mod._parameters[p]
        shape = (w.shape[0],) + ((w.shape[2], w.shape[1]) if transposed(mod) else tuple(w.shape[1:]))
        if shape != (d["num_experts"], n, k):
            raise FormatError(f"{path}: {parent_name}.{p} holds {shape[0]} experts of [out={shape[1]}, in={shape[2]}] "
                              f"in the model but {d['num_experts']} of [{n}, {k}] in the file")


def _read_config(desc: dict, path: Path):
    """The PTQConfig the description records (None when it records none)."""
    from .config import PTQConfig

    if desc.get("config") is None:
        return None
    try:
        return PTQConfig.from_dict(desc["config"])
    except (ValueError, TypeError) as e:
        raise FormatError(f"{path}: the 'config' section is not a PTQConfig this ptqrt ({_version()}) can use: "
                          f"{e}") from None


def _check_kv_cache(model: nn.Module, kvmods: dict, path: Path) -> None:
    """Refuse a model that cannot take the file's int8 KV cache (not a transformers decoder, an attention
    implementation other than sdpa / eager, no attention module where the file has one)."""
    from .integrations import hf

    try:
        hf.check_reattach(model, {n: d["layer_idx"] for n, d in kvmods.items()})
    except (TypeError, ValueError, NotImplementedError) as e:
        raise FormatError(f"{path} holds an int8 KV cache that {type(model).__name__} cannot take: {e}") from None


def _scale_rule(leaf: str):
    """(bad values, what a scale must be) for the buffer `leaf` of a QuantLinear (weight_scale, input_scale,
    smooth_scale), QuantExperts (P_scale, P_input_scale, P_smooth_scale) or KVCacheQuant (k_scale, v_scale);
    None for another tensor. Only what no model ptqrt quantized and saved can hold is refused: every scale is
    absmax / 127 (reference.absmax_scale) or a SmoothQuant factor, so never negative, but
      - a weight scale may be NaN or Inf (absmax_scale passes a NaN / Inf weight of the float model through;
        quantize() takes such a model) or 0 (a subnormal absmax, under about 9e-44, divided by 127 rounds to 0);
      - an input / KV scale is never NaN (the observers count NaN as 0) but may be Inf (a smoothed static range,
        max |x| / s, past the float32 range; a KV cache that held Inf) or 0 (that same rounding);
      - a smooth scale is always finite and positive (smoothquant.smooth_scales clamps it to [1e-5, 1e5]; an
        input divided by 0 or Inf means nothing)."""
    if leaf.endswith("smooth_scale"):
        return (lambda t: ~torch.isfinite(t) | (t <= 0)), "a smooth scale must be finite and > 0"
    if leaf.endswith("input_scale") or leaf in ("k_scale", "v_scale"):
        return (lambda t: torch.isnan(t) | (t < 0)), "an input or KV scale (absmax / 127) must be a number >= 0"
    if leaf.endswith("_scale"):
        return (lambda t: t < 0), "a weight scale (absmax / 127) must be >= 0"
    return None


def _check_scales(swapped: dict, tensors: dict, desc: dict, in_dir: Path) -> None:
    """Refuse a scale of a quantized module holding a value no saved model can (a negative one, a NaN input
    scale, a smooth scale that is not positive): a file written by another tool, or damaged before its
    checksum was taken. Names the tensor, its file and the first bad value."""
    for mname, qm in swapped.items():
        for leaf, like in qm.state_dict().items():
            rule = _scale_rule(leaf)
            if rule is None or not like.is_floating_point():
                continue
            name = f"{mname}.{leaf}"
            t = tensors[name]
            bad = rule[0](t).flatten().nonzero().flatten()
            if len(bad):
                i = int(bad[0])
                at = [int(k) for k in torch.unravel_index(torch.tensor(i), t.shape)]
                raise FormatError(f"tensor {name!r} in {_file_of(desc, name, in_dir)} holds {t.flatten()[i].item()} "
                                  f"at {at} ({len(bad)} of its {t.numel()} values are bad): {rule[1]}")


def _check_meta_tensors(model: nn.Module, swapped: dict, expected: dict, in_dir: Path, replaced=frozenset()) -> None:
    """Refuses a model with a tensor on the meta device that the file cannot fill (a non-persistent
    buffer, such as a rotary table); load_quantized gives the others the file's tensors.
    replaced: the names of float expert weights a QuantExperts takes the place of."""
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if not t.is_meta or name.rpartition(".")[0] in swapped or name in replaced:
            continue
        if name not in expected:
            raise FormatError(f"{name!r} of the model is on the meta device and {in_dir} does not hold it (a buffer "
                              f"that is not saved); build the model on a real device (e.g. the CPU) instead")


def _materialize(model: nn.Module, tensors: dict) -> set:
    """Replace every meta tensor of `model` by its tensor from the file (`tensors`, by state-dict name)
    itself, so that loading a model built on the meta device holds each tensor once, not twice; a meta
    tensor the file does not hold (none reach here but a swapped module's) gets uninitialised CPU
    storage. A tensor that several modules share (tied weights) gets one replacement, so the tie
    survives (nn.Module.to_empty would untie them); a file tensor is given to one model tensor only.
    Returns the state-dict names that now hold their file tensor."""
    new: dict = {}
    given: set = set()
    taken: set = set()
    for mname, mod in model.named_modules(remove_duplicate=False):
        for store in (mod._parameters, mod._buffers):
            for key, t in store.items():
                if t is None or not t.is_meta:
                    continue
                name = f"{mname}.{key}" if mname else key
                if id(t) not in new:
                    src = tensors.get(name)
                    if src is None or id(src) in given:
                        e = torch.empty_like(t, device="cpu") if src is None else src.clone()
                    else:
                        given.add(id(src))
                        e = src
                    new[id(t)] = (t, nn.Parameter(e, t.requires_grad) if isinstance(t, nn.Parameter) else e, e)
                store[key] = new[id(t)][1]
                if tensors.get(name) is new[id(t)][2]:  # else load_state_dict copies the file's values in
                    taken.add(name)
    return taken


def _file_of(desc: dict, name: str, in_dir: Path) -> str:
    files = list(desc["files"])
    if len(files) == 1:
        return str(in_dir / files[0])
    index = in_dir / INDEX
    try:
        return str(in_dir / json.loads(index.read_text())["weight_map"][name])
    except (OSError, ValueError, KeyError):
        return f"{in_dir} ({', '.join(files)})"


def tensor_headers(in_dir, desc: dict, load=lambda name: False) -> dict:
    """{tensor name: (shape, dtype str, tensor or None)} read from the safetensors headers; the data is
    loaded only for names where load(name) is true (for `ptqrt inspect`: the scales). The names are the
    stored tensors only: an alias (desc["aliases"]) takes no room in the files and is not among them, but
    is checked as load_quantized checks it. A file that is missing, truncated or not safetensors raises
    FormatError naming it (the checksums are not computed: see load_quantized for that)."""
    return _each_file(Path(in_dir), desc, lambda path: _headers(path, load), verify=False)


def _headers(path: Path, load) -> dict:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            out[name] = (list(sl.get_shape()), sl.get_dtype(), f.get_tensor(name) if load(name) else None)
    return out
