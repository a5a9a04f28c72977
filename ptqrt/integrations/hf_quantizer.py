"""transformers' own loading of a packed directory: `AutoModelForCausalLM.from_pretrained(dir)`.

save_quantized writes a `quantization_config` into config.json ({"quant_method": "ptqrt", "modules":
the description's module entries, "config": the PTQConfig}). ptqrt registers "ptqrt" with transformers'
quantizers: before the weights load, PtqrtHfQuantizer swaps in empty QuantLinears, KV-cache scale holders
and QuantExperts (the skeleton is on the meta device then) as the entries say; transformers then loads the
file's tensors into them by name, as into any model, and afterwards the int8 KV cache is wired. The model
is the one ptqrt.from_pretrained gives (the same tensors); transformers does not check the file's
SHA-256 (ptqrt.from_pretrained does). save_pretrained of such a model writes a directory that loads this
way again.

Registration needs transformers: `register()` does it (import ptqrt runs it when transformers is already
imported, and otherwise as soon as transformers is).
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


def register() -> None:
    """Make "ptqrt" a quantization method transformers knows (once; later calls do nothing)."""
    with _lock:
        from transformers.quantizers import auto

        if METHOD in auto.AUTO_QUANTIZER_MAPPING:
            return
        config_cls, quantizer_cls = _classes()
        auto.register_quantization_config(METHOD)(config_cls)
        auto.register_quantizer(METHOD)(quantizer_cls)


def _classes():
    from transformers.quantizers import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class PtqrtConfig(QuantizationConfigMixin):
        """What a packed directory's config.json says of its quantization (see quantization_config)."""

        def __init__(self, modules=None, config=None, format_version=None, **kwargs):
            self.quant_method = METHOD
            self.modules = dict(modules or {})
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

        def is_serializable(self, *args, **kwargs) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    PtqrtConfig.__name__ = PtqrtConfig.__qualname__ = "PtqrtConfig"
    PtqrtHfQuantizer.__name__ = PtqrtHfQuantizer.__qualname__ = "PtqrtHfQuantizer"
    return PtqrtConfig, PtqrtHfQuantizer


def _skeleton(model, qcfg) -> None:
    """The quantized modules the entries name, empty (on the meta device), in place of the float ones."""
    from ..format import FormatError
    from ..modules.experts import QuantExperts
    from ..modules.kv_cache import KVCacheQuant
    from ..modules.linear import QuantLinear
    from ..quantize import set_submodule
    from . import hf_experts

    made: dict = {}  # a linear under several names gets one QuantLinear
    try:
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
                    made[id(old)] = QuantLinear.from_description(d, name, device="meta")
                set_submodule(model, name, made[id(old)])
            elif kind == "kv_cache":
                set_submodule(model, name, KVCacheQuant.from_description(d, device="meta"))
            elif kind == "experts":
                parent = model.get_submodule(name.rpartition(".")[0])
                hf_experts.attach(parent, QuantExperts.from_description(d, device="meta"))
                parent._is_hf_initialized = True  # its float weights are gone: nothing for _init_weights
            else:
                raise ValueError(f"module {name!r} is of unknown kind {kind!r}")
    except (AttributeError, ValueError, TypeError) as e:
        raise FormatError(f"config.json's quantization_config does not fit {type(model).__name__}: {e}") from e


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


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers with transformers right after transformers itself is imported (import ptqrt did not
    import it: that costs seconds that users without transformers should not pay)."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            try:
                register()
            except Exception as e:  # noqa: BLE001 - transformers without quantizer registration
                import warnings

                warnings.warn(f"ptqrt: cannot register with transformers {getattr(module, '__version__', '?')} "
                              f"({type(e).__name__}: {e}); ptqrt.from_pretrained still loads packed directories",
                              RuntimeWarning, stacklevel=2)

        loader.exec_module = exec_module
        return spec


def register_when_available() -> None:
    """register() now if transformers is imported, else as soon as it is (nothing if it is not installed)."""
    if "transformers" in sys.modules:
        try:
            register()
        except Exception:  # noqa: BLE001 - an old transformers: ptqrt.from_pretrained still works
            pass
    elif importlib.util.find_spec("transformers") is not None and \
            not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


__all__ = ["METHOD", "quantization_config", "register", "register_when_available"]
