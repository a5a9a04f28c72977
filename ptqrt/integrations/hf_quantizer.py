"""transformers' own loading of a packed directory: `AutoModelForCausalLM.from_pretrained(dir)`.

save_quantized writes a `quantization_config` into config.json ({"quant_method": "ptqrt", "modules":
the description's module entries, "config": the PTQConfig}). ptqrt registers "ptqrt" with transformers'
quantizers: before the weights load, PtqrtHfQuantizer swaps in empty QuantLinears, KV-cache scale holders
and QuantExperts (the skeleton is on the meta device then) as the entries say; transformers then loads the
file's tensors into them by name, as into any model, and afterwards the int8 KV cache is wired. The model
is the one ptqrt.from_pretrained gives (the same tensors); transformers does not check the file's
SHA-256 (ptqrt.from_pretrained does). save_pretrained of such a model writes a directory that loads this
way again.

Registration needs transformers: `register()` does it (import ptqrt runs it when transformers' quantizer
registry is already imported, and otherwise as soon as it is; quantize and load_quantized also give the
model's config the quantization_config, `record`, so that its own save_pretrained writes it).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading

METHOD = "ptqrt"
_lock = threading.Lock()


def quantization_config(desc: dict) -> dict:
    """The `quantization_config` entry of config.json for the packed description `desc`."""
    return {"quant_method": METHOD, "format_version": desc["format_version"], "modules": desc["modules"],
            "config": desc["config"]}


def record(model) -> None:
    """Give a transformers model that ptqrt quantized or loaded the `quantization_config` that lets its own
    save_pretrained write a directory transformers' from_pretrained loads (quantize and load_quantized
    call it; save_quantized writes the same into config.json)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return
    from ..format import FORMAT_VERSION, _modes

    modules, _ = _modes(model, [])
    ptq = getattr(model, "ptqrt_config", None)
    config.quantization_config = quantization_config(
        {"format_version": FORMAT_VERSION, "modules": modules, "config": ptq.to_dict() if ptq is not None else None})


def register() -> None:
    """Make "ptqrt" a quantization method transformers knows (once; later calls do nothing)."""
    with _lock:
        from transformers.quantizers import auto

        if "PtqrtConfig" not in globals():
            config_cls, quantizer_cls = _classes()
            globals().update(PtqrtConfig=config_cls, PtqrtHfQuantizer=quantizer_cls)  # pickles by module name
        if METHOD in auto.AUTO_QUANTIZER_MAPPING:
            return
        auto.register_quantization_config(METHOD)(globals()["PtqrtConfig"])
        auto.register_quantizer(METHOD)(globals()["PtqrtHfQuantizer"])


def _classes():
    from transformers.quantizers.base import HfQuantizer  # not the package: it may be mid-import (HOOKED)
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class PtqrtConfig(QuantizationConfigMixin):
        """What a packed directory's config.json says of its quantization (see quantization_config)."""

        def __init__(self, modules=None, config=None, format_version=None, **kwargs):
            self.quant_method = METHOD
            self.modules = modules  # checked when a model is loaded (_skeleton)
            self.config = config
            self.format_version = format_version

        def to_dict(self) -> dict:
            return {"quant_method": METHOD, "format_version": self.format_version, "modules": self.modules,
                    "config": self.config}

    class PtqrtHfQuantizer(HfQuantizer):
        """Loads ptqrt's packed tensors (int8 weights and float32 scales) into the modules ptqrt runs them with."""

        requires_calibration = True  # a model is quantized by ptqrt.quantize, never on load

        def __init__(self, quantization_config, **kwargs):
            if not kwargs.get("pre_quantized", True):
                raise ValueError("the 'ptqrt' quantization method loads what ptqrt.save_quantized wrote; it does not "
                                 "quantize a float model while transformers loads it: load the float model, then "
                                 "ptqrt.quantize(model, PTQConfig(...), calib_data) and ptqrt.save_quantized")
            super().__init__(quantization_config, **kwargs)

        def _process_model_before_weight_loading(self, model, **kwargs):
            _skeleton(model, self.quantization_config)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            _finish(model, self.quantization_config)
            return model

        def dequantize(self, model, dtype=None):
            """model.dequantize(): float modules in place of ptqrt's (ptqrt.dequantize). Without a dtype each
            new linear takes its bias's (else the model's) dtype, which follows casts: transformers'
            default, config.dtype, is the dtype the model was loaded in."""
            from ..dequantize import dequantize

            dequantize(model, dtype)
            self.remove_quantization_config(model)
            return model

        def is_serializable(self, *args, **kwargs) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    for cls in (PtqrtConfig, PtqrtHfQuantizer):
        cls.__qualname__ = cls.__name__
        cls.__module__ = __name__
    return PtqrtConfig, PtqrtHfQuantizer


def _skeleton(model, qcfg) -> None:
    """The quantized modules the entries name, empty (on the meta device), in place of the float ones."""
    from pathlib import Path

    from ..format import FORMAT_VERSION, FormatError, _check_module_entry
    from ..modules.experts import QuantExperts
    from ..modules.kv_cache import KVCacheQuant
    from ..modules.linear import QuantLinear
    from ..quantize import set_submodule
    from . import hf_experts

    made: dict = {}  # a linear under several names gets one QuantLinear
    try:
        if qcfg.format_version != FORMAT_VERSION or not isinstance(qcfg.modules, dict):
            raise ValueError(f"it is format version {qcfg.format_version!r} with modules {type(qcfg.modules).__name__} "
                             f"(this ptqrt reads version {FORMAT_VERSION}, with a dict of module entries)")
        for saved, d in qcfg.modules.items():
            _check_module_entry(saved, d, Path("config.json"))
        saved_as = list(getattr(model.config, "architectures", None) or [])
        for saved, d in qcfg.modules.items():
            name = _in_model(model, saved)
            if name is None:
                if type(model).__name__ in saved_as:
                    raise ValueError(f"it has no module {saved!r}")
                continue  # a module of the head the saved model had and this one lacks (AutoModel of a causal LM)
            kind = d.get("kind", "linear")
            if kind == "linear":
                old = model.get_submodule(name)
                if id(old) not in made:
                    made[id(old)] = QuantLinear.from_description(_bias_as(d, old), name, device="meta")
                set_submodule(model, name, made[id(old)])
            elif kind == "kv_cache":
                set_submodule(model, name, KVCacheQuant.from_description(d, device="meta"))
            elif kind == "experts":
                parent = model.get_submodule(name.rpartition(".")[0])
                hf_experts.attach(parent, QuantExperts.from_description(d, device="meta"))
                parent._is_hf_initialized = True  # its float weights are gone: nothing for _init_weights
            else:
                raise ValueError(f"module {name!r} is of unknown kind {kind!r}")
    except (AttributeError, ValueError, TypeError, KeyError) as e:
        raise FormatError(f"config.json's quantization_config does not fit {type(model).__name__}: {e}") from e
    ties = getattr(model, "all_tied_weights_keys", None)
    if ties:  # a tie into a quantized module (an int8 lm_head that was tied to the embedding) is no tie now
        def quantized(name):
            try:
                return isinstance(model.get_submodule(name.rpartition(".")[0]), QuantLinear)
            except AttributeError:
                return False
        model.all_tied_weights_keys = {t: s for t, s in ties.items() if not quantized(t) and not quantized(s)}


def _bias_as(d: dict, old) -> dict:
    """The entry `d` with the bias in the dtype transformers built the float linear `old` in (the dtype
    from_pretrained was asked for), as a model cast with .to(dtype) has it; the scales stay float32."""
    from ..modules.linear import linear_weight

    w = linear_weight(old)
    if not d.get("bias") or not w.is_floating_point():
        return d
    return {**d, "bias_dtype": str(w.dtype).replace("torch.", "")}


def _in_model(model, name: str):
    """The name in `model` of the module saved as `name`: the same, or with the base model's prefix taken
    off or put on (a causal LM's directory loaded by AutoModel, and the other way), as transformers does
    for the tensors' names; None where it has none."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [name]
    if prefix and name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1:])
    elif prefix:
        candidates.append(f"{prefix}.{name}")
    for cand in candidates:
        parent = cand.rpartition(".")[0]
        try:
            if parent:
                model.get_submodule(parent)
            if cand.rpartition(".")[2] in ("kv_quant", "ptqrt_experts") or model.get_submodule(cand) is not None:
                return cand
        except AttributeError:
            continue
    return None


def _finish(model, qcfg) -> None:
    from pathlib import Path

    from ..format import _read_config

    if any(d.get("kind") == "kv_cache" for d in qcfg.modules.values()):
        from . import hf

        hf.reattach(model)
    config = _read_config({"config": qcfg.config}, Path("config.json"))
    if config is not None:
        model.ptqrt_config = config


HOOKED = "transformers.quantizers.auto"  # what transformers' from_pretrained reads quantization methods from


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers with transformers right after its quantizers' registry module is imported (which its
    from_pretrained does): import ptqrt imports none of transformers, whose import costs users without it
    seconds, and importing transformers costs no more for it either. A spec looked up without an import
    (importlib.util.find_spec) is handed out like any other; the finder stays until the module runs."""

    _busy = threading.local()

    def find_spec(self, name, path=None, target=None):
        if name != HOOKED or getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy.on = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run, finder = loader.exec_module, self

        def exec_module(module):
            run(module)
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
            try:
                register()
            except Exception as e:  # noqa: BLE001 - transformers without quantizer registration
                import warnings

                warnings.warn(f"ptqrt: cannot register its quantization method with transformers ({type(e).__name__}: "
                              f"{e}); ptqrt.from_pretrained still loads packed directories", RuntimeWarning, stacklevel=2)

        loader.exec_module = exec_module
        return spec


def register_when_available() -> None:
    """register() now if transformers' quantizer registry is imported, else as soon as it is (nothing if
    transformers is not installed)."""
    if HOOKED in sys.modules:
        try:
            register()
        except Exception:  # noqa: BLE001 - an old transformers: ptqrt.from_pretrained still works
            pass
    elif importlib.util.find_spec("transformers") is not None and \
            not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def __getattr__(name):  # PtqrtConfig / PtqrtHfQuantizer: made with transformers, when it is there (pickle)
    if name in ("PtqrtConfig", "PtqrtHfQuantizer"):
        register()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHOD", "quantization_config", "record", "register", "register_when_available"]
