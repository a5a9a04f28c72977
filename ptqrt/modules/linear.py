"""QuantLinear: the drop-in replacement for nn.Linear (and GPT-2's Conv1D) that runs ptqrt's ops.

Buffers (all persistent, saved by save_quantized):
  weight        int8 [N, K]                         RTN/GPTQ int8 weights, row-major
  weight_scale  float32 [N] or [N, K // group_size] per-channel or per-group scales
  bias          original float dtype [N], optional
  input_scale   float32 [1]                         W8A8 (static) only: calibrated absmax / 127
  smooth_scale  float32 [K], optional               SmoothQuant factors not folded into a norm: x / s

A dtype cast of the model (.half(), .to(torch.bfloat16)) casts the bias and leaves the scales float32
(they still follow device moves): the ops read float32 scales.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from ..config import PTQConfig
from ..reference import absmax_scale, quantize_weight
from .scales import keep_float32
from .straight_through import int8_linear

MODES = ("W8A16", "W8A8", "W8A8_DYNAMIC")
SCALES = ("weight_scale", "input_scale", "smooth_scale")  # float32 whatever the model dtype


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The [N, K] weight of an nn.Linear, or of a GPT-2 style Conv1D (stored [K, N])."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.t()
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def is_quantizable(module: nn.Module) -> bool:
    """An nn.Linear that computes nn.Linear's own forward, or a GPT-2 Conv1D. A subclass with a forward
    of its own (an MoE router returning routing tuples, a grouped linear) and nn.MultiheadAttention's
    out_proj (whose weight the attention reads directly) would not survive the swap: they stay float."""
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward and not isinstance(
            module, nn.modules.linear.NonDynamicallyQuantizableLinear)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class QuantLinear(nn.Module):
    """y = x @ dequant(weight)^T + bias, with x quantized to int8 first in the W8A8 modes.

    Accepts x [..., K] in float16 / bfloat16 / float32 and returns [..., N] in x's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "W8A16",
                 group_size: int = 0, has_smooth: bool = False, bias_dtype: torch.dtype = torch.float32,
                 device=None, name: str = "") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"QuantLinear: mode must be one of {MODES}; got {mode!r}")
        if group_size and (mode != "W8A16" or in_features % group_size):
            raise ValueError(f"QuantLinear: group_size={group_size} needs mode W8A16 and must divide "
                             f"in_features={in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.group_size, self.name = mode, group_size, name
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        sshape = (out_features, in_features // group_size) if group_size else (out_features,)
        self.register_buffer("weight_scale", torch.ones(sshape, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device) if mode == "W8A8" else None)
        self.register_buffer("smooth_scale", torch.ones(in_features, dtype=torch.float32, device=device) if has_smooth else None)
        self._checked: set = set()  # _direct_key()s of calls the public ops accepted

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_float(cls, module: nn.Module, config: PTQConfig, name: str = "",
                   input_absmax: Optional[torch.Tensor] = None, smooth: Optional[torch.Tensor] = None,
                   qweight: Optional[tuple] = None) -> "QuantLinear":
        """Quantize a float nn.Linear / Conv1D with `config` (RTN weights unless `qweight` = (w_q, scale)
        is given, e.g. from GPTQ). `input_absmax` (static W8A8) is the calibrated absmax of the
        layer's input after smoothing; `smooth` [K] is a factor the input is divided by at run time."""
        w = linear_weight(module)
        n, k = w.shape
        mode = config.mode
        g = config.weight_group
        if g and k % g:
            raise ValueError(f"PTQConfig.group_size={g} does not divide K={k} of layer {name or '?'}")
        bias = getattr(module, "bias", None)
        q = cls(k, n, bias is not None, mode, g, smooth is not None,
                bias.dtype if bias is not None else w.dtype, w.device, name)
        if qweight is None:
            wf = w.detach().float()
            if smooth is not None:  # W·diag(s): the input is divided by s at run time
                wf = wf * smooth.float().to(wf.device)[None, :]
            qweight = quantize_weight(wf, g)
        q.weight.copy_(qweight[0])
        q.weight_scale.copy_(qweight[1].reshape(q.weight_scale.shape))
        if bias is not None:
            q.bias.copy_(bias.detach())
        if mode == "W8A8":
            if input_absmax is None:
                raise ValueError(f"layer {name or '?'}: static W8A8 needs a calibrated input absmax; "
                                 f"pass calib_data to quantize()")
            q.input_scale.copy_(absmax_scale(input_absmax.float().reshape(1)))
        if smooth is not None:
            q.smooth_scale.copy_(smooth.float())
        return q

    # ------------------------------------------------------------------ run
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"QuantLinear {self.name!r}: input must be a float tensor; got {got}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear {self.name!r}: input must be [..., {self.in_features}]; "
                             f"got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        key = self._direct_key(x2)
        if key is not None and key in self._checked:
            run = ops.resolve  # the backends' own callables: the public ops checked these tensors before
        else:
            run = None
        b = self._buffers
        w, ws, bias, smooth = b["weight"], b["weight_scale"], b["bias"], b["smooth_scale"]
        m, dev = x2.shape[0], x2.device

        def int8(x2, bias):
            if self.mode == "W8A16":
                fn = run("w8a16_gemm", dev, m)[1] if run else ops.w8a16_gemm
                return fn(x2, w, ws, bias, self.group_size)
            if self.mode == "W8A8_DYNAMIC":
                x_q, x_scale = (run("quantize_per_token", dev, m)[1] if run else ops.quantize_per_token)(x2, smooth)
                return (run("w8a8_gemm", dev, m)[1] if run else ops.w8a8_gemm)(x_q, x_scale, w, ws, bias, x.dtype)
            s = b["input_scale"]
            x_q = (run("quantize_per_tensor", dev, m)[1] if run else ops.quantize_per_tensor)(x2, s, smooth)
            return (run("w8a8_gemm", dev, m)[1] if run else ops.w8a8_gemm)(x_q, s, w, ws, bias, x.dtype)

        y = int8_linear(x2, bias, w, ws, smooth, self.group_size, int8)  # the straight-through gradient, if wanted
        if run is None and key is not None:
            ops.remember(self._checked, key)
        return y.reshape(*lead, self.out_features)

    def _direct_key(self, x2: torch.Tensor) -> Optional[tuple]:
        """Everything the ops' input checks read that can change between calls: x's dtype and device,
        the backend setting, and each of this module's tensors (which tensor, its dtype, its device;
        shapes are fixed at construction and x's K is checked above). After the public ops accepted
        one call with a key, plain eager calls with the same key call the backend directly (~17-20 us
        less a forward on the CPU). None where the call must go through the ops: compiling, tracing,
        a torch-function or dispatch mode, a tensor subclass, a gradient to track, forward-mode AD or a
        torch.func transform, or meta tensors (the ops' fake impls answer those)."""
        if type(x2) is not torch.Tensor or not ops.plain_eager_mode() or ops._transformed() or x2.is_meta:
            return None
        tensors = tuple(self._buffers.values())
        if torch.is_grad_enabled() and (x2.requires_grad or any(t is not None and t.requires_grad for t in tensors)):
            return None
        return (x2.dtype, x2.device, ops.get_backend(), self.mode, self.group_size) + tuple(
            None if t is None else (id(t), t.dtype, t.device) for t in tensors)

    def _apply(self, fn, recurse=True):
        return super()._apply(keep_float32(fn, self, SCALES), recurse)

    def __setstate__(self, state) -> None:  # unpickling a module saved before `_checked` existed
        super().__setstate__(state)
        self.__dict__.setdefault("_checked", set())

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [N, K] as the kernels see it (smoothing factors divided back out)."""
        from ..reference import dequantize_weight
        w = dequantize_weight(self.weight, self.weight_scale, self.group_size)
        return w / self.smooth_scale[None, :] if self.smooth_scale is not None else w

    def describe(self) -> dict:
        """What the packed format records for this module (enough to rebuild it empty)."""
        return {"kind": "linear", "mode": self.mode, "in_features": self.in_features, "out_features": self.out_features,
                "group_size": self.group_size, "bias": self.bias is not None,
                "bias_dtype": str(self.bias.dtype).replace("torch.", "") if self.bias is not None else None,
                "has_smooth": self.smooth_scale is not None}

    @classmethod
    def from_description(cls, d: dict, name: str = "", device=None) -> "QuantLinear":
        bias_dtype = getattr(torch, d["bias_dtype"]) if d.get("bias_dtype") else torch.float32
        return cls(d["in_features"], d["out_features"], d["bias"], d["mode"], d["group_size"],
                   d["has_smooth"], bias_dtype, device, name)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{g}, bias={self.bias is not None}"


def prepack(model: nn.Module) -> int:
    """Packs the W8A8 QuantLinear weights of `model` that live on the CPU into the `cpu` backend's
    kernel layout now (at load time), instead of on each weight's first call; call it after the
    weights are loaded. Each weight is packed afresh, replacing any copy already cached. The cache
    sees an in-place write to a weight through its version counter and repacks on the next call;
    writes that bypass the counter (through `.data`, a numpy view of the weight) are not seen, so
    call `prepack` again after them. Weights made under `torch.inference_mode()` (which calls never
    cache: they have no version counter) are packed too, as snapshots: write one in place afterwards
    and call `prepack` again. Returns how many weights the backend's cache now
    holds packed: 0 where another backend runs them (`set_backend`), the extension is unavailable,
    the CPU takes the scalar path, or the cache is off (`PTQRT_CPU_PACK_MB=0`) or full."""
    if ops.get_backend() not in ("auto", "cpu"):
        return 0
    from .. import _build
    if _build.load("cpu") is None:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.mode != "W8A16" and module.weight.device.type == "cpu":
            count += bool(torch.ops.ptqrt_cpu.pack_weight(module.weight))
    return count
