// The C++ entry points of the ptqrt_cuda ops (registered in registration.cpp). Signatures follow the
// schemas, which match ptqrt/ops.py; each lives in the host file named after its op.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/ATen.h>

namespace ptqrt {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, const std::optional<at::Tensor>& smooth);
at::Tensor quantize_per_tensor(const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& smooth);
at::Tensor w8a8_gemm(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q, const at::Tensor& w_scale,
                     const std::optional<at::Tensor>& bias, at::ScalarType out_dtype);
at::Tensor w8a16_gemm(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                      const std::optional<at::Tensor>& bias, int64_t group_size);
void kv_cache_append(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                     at::Tensor& k_scale, at::Tensor& v_scale, const at::Tensor& slots);
at::Tensor int8_kv_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& k_scale, const at::Tensor& v_scale, const at::Tensor& block_table,
                                    const at::Tensor& seq_lens, double sm_scale);

}  // namespace cuda
}  // namespace ptqrt
