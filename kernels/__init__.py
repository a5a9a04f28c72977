"""Triton kernels of ptqrt (installed as ``ptqrt.kernels``): the ``triton`` backend.

``OPS`` maps each op name to its launcher; every launcher takes exactly the arguments of the
function of the same name in ``ptqrt.reference`` (positional, inputs already validated by
``ptqrt._checks``) and runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
One op family per file: quantize.py, w8a8_gemm.py, w8a16_gemm.py, kv_cache.py.
"""
from .kv_cache import int8_kv_decode_attention, kv_cache_append
from .quantize import quantize_per_tensor, quantize_per_token
from .w8a16_gemm import w8a16_gemm
from .w8a8_gemm import w8a8_gemm

OPS = {
    "quantize_per_token": quantize_per_token,
    "quantize_per_tensor": quantize_per_tensor,
    "w8a8_gemm": w8a8_gemm,
    "w8a16_gemm": w8a16_gemm,
    "kv_cache_append": kv_cache_append,
    "int8_kv_decode_attention": int8_kv_decode_attention,
}

__all__ = ["OPS", *OPS]
