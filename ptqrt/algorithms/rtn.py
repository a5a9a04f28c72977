"""RTN / MinMax weight quantization: symmetric int8, per output channel or per group of K.

w_q = clamp(round(w / s), -127, 127), s = absmax / 127 over the channel (or group); 0 -> s = 1.
The math lives in ptqrt.reference (the oracle); this module is its name in the algorithms family.
"""
from ..reference import dequantize_weight, quantize_weight

__all__ = ["quantize_weight", "dequantize_weight"]
