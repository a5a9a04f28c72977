"""PTQConfig: what to quantize and how. All validation lives here, with errors that name the field.

Modes that follow from the fields (the names used in the packed format):
  act_dtype=None                          -> W8A16          (int8 weights, float activations)
  act_dtype="int8", act_granularity="per_token"  -> W8A8_DYNAMIC (scales computed per token at run time)
  act_dtype="int8", act_granularity="per_tensor" -> W8A8         (static scale from calibration)
  kv_cache_dtype="int8"                    -> C8             (int8 KV cache)
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Optional

_CHOICES = {
    "weight_dtype": ("int8",),
    "weight_granularity": ("per_channel", "per_group"),
    "act_dtype": (None, "int8"),
    "act_granularity": ("per_token", "per_tensor"),
    "act_observer": ("minmax", "percentile"),
    "kv_cache_dtype": (None, "int8"),
    "kv_granularity": ("per_token", "per_channel"),
    "outliers": ("none", "smooth", "osl"),
    "precision_recovery": ("none", "gptq"),
}


def _allowed(name: str) -> str:
    return ", ".join(repr(c) for c in _CHOICES[name])


@dataclass
class PTQConfig:
    """How to quantize a model (after MindSpore Golden Stick's PTQ/RTN).

    weight_dtype: "int8" (weights are always quantized; activation-only quantization is not offered).
    weight_granularity: "per_channel" (one scale per output row) or "per_group" (group_size columns).
    group_size: 0 for per_channel; for per_group a positive multiple of 16 that divides each layer's K.
    act_dtype: None (W8A16) or "int8" (W8A8). act_granularity: "per_token" (dynamic) or "per_tensor" (static,
        calibrated); "per_tensor" needs act_dtype="int8".
    act_observer: how a static scale is set from the calibration inputs: "minmax" (max |x|) or "percentile"
        (the act_percentile quantile of |x|, after smoothing, over a uniform sample of up to 2048 of the
        calibration tokens: a few outliers clipped for finer steps on the rest; the max where the quantile
        is 0); "percentile" needs act_granularity="per_tensor". act_percentile: in (0, 1], default 0.9999
        (1 is the max over every token, as minmax).
    kv_cache_dtype: None or "int8"; kv_granularity: "per_token" (dynamic per token-head) or "per_channel" (static);
        "per_channel" needs kv_cache_dtype="int8".
    outliers: "none", "smooth" (SmoothQuant with smooth_alpha) or "osl" (alpha searched per layer).
    precision_recovery: "none" or "gptq"; gptq_act_order: quantize columns by decreasing Hessian
        diagonal (GPTQ's activation order; per-group scales then come from the original weights).
    skip: module names not to quantize. An entry made only of name characters (letters, digits, "_",
        "-", ".") is a name and matches as a literal substring, its dots plain dots ("layers.1." is layer 1, not
        layers.10-19); any other entry is a regex (re.search), or matches as a substring.
    layer_policies: {pattern: PTQConfig} — the first pattern (a name or a regex, matched as for skip)
        that matches a module's name overrides the config.
        A policy sets how its layers are quantized; the model-wide fields (skip, layer_policies,
        kv_cache_dtype, kv_granularity) must keep their defaults in it.
    """

    weight_dtype: str = "int8"
    weight_granularity: str = "per_channel"
    group_size: int = 0
    act_dtype: Optional[str] = None
    act_granularity: str = "per_token"
    act_observer: str = "minmax"
    act_percentile: float = 0.9999
    kv_cache_dtype: Optional[str] = None
    kv_granularity: str = "per_token"
    outliers: str = "none"
    smooth_alpha: float = 0.5
    precision_recovery: str = "none"
    gptq_act_order: bool = False
    skip: list = field(default_factory=lambda: ["lm_head"])
    layer_policies: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name, choices in _CHOICES.items():
            val = getattr(self, name)
            if val not in choices:
                if name == "weight_dtype" and val in (None, "none", "fp16", "float"):
                    raise ValueError(f"PTQConfig.weight_dtype={val!r}: activation-only quantization is not "
                                     f"supported; weight_dtype must be one of {_allowed(name)}")
                raise ValueError(f"PTQConfig.{name}={val!r} is not allowed; choose one of {_allowed(name)}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise ValueError(f"PTQConfig.group_size={self.group_size!r} must be a non-negative int")
        if self.weight_granularity == "per_group":
            if self.group_size == 0:
                raise ValueError("PTQConfig.group_size must be set (e.g. 64 or 128) when "
                                 "weight_granularity='per_group'")
            if self.group_size % 16:
                raise ValueError(f"PTQConfig.group_size={self.group_size} must be a multiple of 16")
        elif self.group_size != 0:
            raise ValueError(f"PTQConfig.group_size={self.group_size} is only allowed with "
                             f"weight_granularity='per_group' (per_channel takes group_size=0)")
        if self.act_dtype == "int8" and self.weight_granularity == "per_group":
            raise ValueError("PTQConfig.weight_granularity='per_group' cannot be combined with act_dtype='int8': "
                             "W8A8 needs per-channel weight scales (allowed: 'per_channel')")
        if self.act_dtype is None and self.act_granularity != "per_token":
            raise ValueError(f"PTQConfig.act_granularity={self.act_granularity!r} sets how int8 activations are "
                             f"scaled and needs act_dtype='int8'; with act_dtype=None (W8A16) leave it 'per_token'")
        if isinstance(self.act_percentile, bool) or not isinstance(self.act_percentile, (int, float)) \
                or not 0.0 < float(self.act_percentile) <= 1.0:
            raise ValueError(f"PTQConfig.act_percentile={self.act_percentile!r} must be a float in (0, 1]")
        if self.act_observer == "percentile" and self.act_granularity != "per_tensor":
            raise ValueError("PTQConfig.act_observer='percentile' sets a static activation scale and needs "
                             "act_dtype='int8' with act_granularity='per_tensor' (dynamic scales use each token's max)")
        if self.act_observer != "percentile" and self.act_percentile != PTQConfig.act_percentile:
            raise ValueError(f"PTQConfig.act_percentile={self.act_percentile!r} is used only with "
                             f"act_observer='percentile'; got act_observer={self.act_observer!r}")
        if self.kv_cache_dtype is None and self.kv_granularity != "per_token":
            raise ValueError(f"PTQConfig.kv_granularity={self.kv_granularity!r} sets how the int8 KV cache is "
                             f"scaled and needs kv_cache_dtype='int8'; with kv_cache_dtype=None leave it 'per_token'")
        if self.outliers != "none" and self.act_dtype is None:
            raise ValueError(f"PTQConfig.outliers={self.outliers!r} suppresses activation outliers and needs "
                             f"act_dtype='int8'; with act_dtype=None use outliers='none'")
        if not isinstance(self.gptq_act_order, bool):
            raise ValueError(f"PTQConfig.gptq_act_order={self.gptq_act_order!r} must be True or False")
        if self.gptq_act_order and self.precision_recovery != "gptq":
            raise ValueError("PTQConfig.gptq_act_order=True needs precision_recovery='gptq'")
        if isinstance(self.smooth_alpha, bool) or not isinstance(self.smooth_alpha, (int, float)) \
                or not 0.0 <= float(self.smooth_alpha) <= 1.0:
            raise ValueError(f"PTQConfig.smooth_alpha={self.smooth_alpha!r} must be a float in [0, 1]")
        if isinstance(self.skip, str):
            self.skip = [self.skip]
        if not isinstance(self.skip, (list, tuple)) or not all(isinstance(s, str) for s in self.skip):
            raise ValueError(f"PTQConfig.skip must be a list of strings; got {self.skip!r}")
        self.skip = list(self.skip)
        for s in self.skip:
            _compile(s, "skip")
        if not isinstance(self.layer_policies, dict):
            raise ValueError(f"PTQConfig.layer_policies must be a dict {{regex: PTQConfig}}; got {type(self.layer_policies).__name__}")
        for pat, sub in self.layer_policies.items():
            if not isinstance(pat, str):
                raise ValueError(f"PTQConfig.layer_policies: keys must be regex strings (saved in the packed "
                                 f"format's JSON); got {type(pat).__name__} {pat!r}")
            _compile(pat, "layer_policies")
            if isinstance(sub, dict):
                sub = PTQConfig(**sub)
                self.layer_policies[pat] = sub
            if not isinstance(sub, PTQConfig):
                raise ValueError(f"PTQConfig.layer_policies[{pat!r}] must be a PTQConfig; got {type(sub).__name__}")
            _check_policy(pat, sub)

    # ------------------------------------------------------------------ derived
    @property
    def mode(self) -> str:
        """FLOAT is never returned here: a config always quantizes weights."""
        if self.act_dtype is None:
            return "W8A16"
        return "W8A8_DYNAMIC" if self.act_granularity == "per_token" else "W8A8"

    @property
    def weight_group(self) -> int:
        """The group size the weights are quantized with: group_size under per_group, 0 (per channel) else."""
        return self.group_size if self.weight_granularity == "per_group" else 0

    @property
    def needs_calibration(self) -> bool:
        """Whether the linears need calibration data (static scales, smoothing, GPTQ)."""
        return self.mode == "W8A8" or self.outliers != "none" or self.precision_recovery != "none"

    @property
    def kv_needs_calibration(self) -> bool:
        """Whether the int8 KV cache needs calibration data (static per-channel scales)."""
        return self.kv_cache_dtype == "int8" and self.kv_granularity == "per_channel"

    def is_skipped(self, name: str) -> bool:
        return any(matches(s, name) for s in self.skip)

    def for_layer(self, name: str) -> "PTQConfig":
        """The config that applies to module `name`: the first matching layer policy, else self."""
        for pat, sub in self.layer_policies.items():
            if matches(pat, name):
                return sub
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_policies"] = {k: v.to_dict() for k, v in self.layer_policies.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PTQConfig":
        if not isinstance(d, dict):
            raise ValueError(f"PTQConfig.from_dict: expected a dict of fields; got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"PTQConfig: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        policies = d.get("layer_policies", {})
        if not isinstance(policies, dict):
            raise ValueError(f"PTQConfig.layer_policies must be a dict {{regex: fields}}; "
                             f"got {type(policies).__name__}")
        d["layer_policies"] = {k: cls.from_dict(v) for k, v in policies.items()}
        return cls(**d)


# Fields a layer policy cannot change: they apply to the whole model (which layers are quantized at
# all, the KV cache) and are read from the top-level config only.
_MODEL_WIDE = ("skip", "layer_policies", "kv_cache_dtype", "kv_granularity")


def _check_policy(pattern: str, sub: PTQConfig) -> None:
    """A policy may set how its layers are quantized, not the model-wide fields, which it would ignore."""
    defaults = PTQConfig()
    for name in _MODEL_WIDE:
        if getattr(sub, name) != getattr(defaults, name):
            hint = ("add the name to the top-level skip instead" if name == "skip" else
                    "set it on the top-level config instead")
            raise ValueError(f"PTQConfig.layer_policies[{pattern!r}].{name}={getattr(sub, name)!r} would be ignored: "
                             f"a layer policy sets how its layers are quantized, and {name} applies to the whole "
                             f"model; {hint}")


_NAME = re.compile(r"[\w.-]+")  # what module names are made of ("-" is literal outside a class)


def matches(pattern: str, name: str) -> bool:
    """Whether a skip / layer_policies entry selects module `name`: a plain name (letters, digits, "_",
    "-", ".") as a literal substring, where a regex's "." would also take "layers.1." to layers.10-19;
    anything else as a regex (re.search) or a substring."""
    if _NAME.fullmatch(pattern):
        return pattern in name
    return pattern in name or re.search(pattern, name) is not None


def _compile(pattern: str, where: str):
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"PTQConfig.{where}: {pattern!r} is not a valid regex ({e})") from None
