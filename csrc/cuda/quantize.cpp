// Host glue of quantize_per_token / quantize_per_tensor: check, allocate, launch on the current stream.
#include "host.h"
#include "ops.h"

namespace ptqrt {
namespace cuda {

namespace {
// smooth [K] in any float dtype -> fp32 (the reference divides by smooth.float()).
at::Tensor smooth_f32(const char* op, const std::optional<at::Tensor>& smooth, const at::Tensor& x) {
  if (!smooth.has_value() || !smooth->defined()) return at::Tensor();
  const at::Device dev = x.device();
  check_tensor(op, "smooth", *smooth, kFloats(), 1, &dev);
  check_shape(op, "smooth", *smooth, {x.size(1)}, "(one factor per input channel K)");
  return as_float32(*smooth);
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, const std::optional<at::Tensor>& smooth) {
  const char* op = "quantize_per_token";
  check_tensor(op, "x", x, kFloats(), 2);
  const DeviceGuard guard(x.device());
  const at::Tensor sm = smooth_f32(op, smooth, x);
  const int64_t M = x.size(0), K = x.size(1);
  check_int32_range(op, "M", M);
  at::Tensor x_q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor x_scale = at::empty({M}, x.options().dtype(at::kFloat));
  const bool vec = K % 16 == 0 && aligned16(x) && (!sm.defined() || aligned16(sm));
  check_launch(op, launch_quantize_per_token(to_dtype(x.scalar_type()), x.data_ptr(),
                                                   sm.defined() ? sm.data_ptr<float>() : nullptr,
                                                   x_q.data_ptr<int8_t>(), x_scale.data_ptr<float>(), M, K, vec,
                                                   quant_one_pass_enabled(), quant_reciprocal_enabled(), current_stream()));
  return {x_q, x_scale};
}

at::Tensor quantize_per_tensor(const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& smooth) {
  const char* op = "quantize_per_tensor";
  check_tensor(op, "x", x, kFloats(), 2);
  const at::Device dev = x.device();
  check_tensor(op, "scale", scale, {at::kFloat}, -1, &dev);
  TORCH_CHECK(scale.numel() == 1, "ptqrt_cuda.", op, ": scale must hold exactly one value; got ", describe(scale));
  const DeviceGuard guard(x.device());
  const at::Tensor sm = smooth_f32(op, smooth, x);
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor x_q = at::empty({M, K}, x.options().dtype(at::kChar));
  const bool vec = K % 16 == 0 && aligned16(x) && (!sm.defined() || aligned16(sm));
  check_launch(op, launch_quantize_per_tensor(to_dtype(x.scalar_type()), x.data_ptr(), scale.data_ptr<float>(),
                                                    sm.defined() ? sm.data_ptr<float>() : nullptr,
                                                    x_q.data_ptr<int8_t>(), M, K, vec, quant_reciprocal_enabled(),
                                                    current_stream()));
  return x_q;
}

}  // namespace cuda
}  // namespace ptqrt
