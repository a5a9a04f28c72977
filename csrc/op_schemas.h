// The schemas of the ops every native backend registers, one list for all of them: the same
// signatures as ptqrt/ops.py (the public ptqrt:: ops) and ptqrt/reference.py. Each backend's
// registration file calls ptqrt_define_ops inside its TORCH_LIBRARY block (ptqrt_cpu, ptqrt_cuda,
// and the CUDA emulator's ptqrt_cuda_emu) and binds its own kernels with TORCH_LIBRARY_IMPL.
#pragma once

#include <torch/library.h>

inline void ptqrt_define_ops(torch::Library& m) {
  m.def("quantize_per_token(Tensor x, Tensor? smooth=None) -> (Tensor, Tensor)");
  m.def("quantize_per_tensor(Tensor x, Tensor scale, Tensor? smooth=None) -> Tensor");
  m.def("w8a8_gemm(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias=None, "
        "ScalarType out_dtype=float32) -> Tensor");
  m.def("w8a16_gemm(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias=None, SymInt group_size=0) -> Tensor");
  m.def("kv_cache_append(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) k_scale, "
        "Tensor(d!) v_scale, Tensor slots) -> ()");
  m.def("int8_kv_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_scale, Tensor v_scale, "
        "Tensor block_table, Tensor seq_lens, float sm_scale) -> Tensor");
}
