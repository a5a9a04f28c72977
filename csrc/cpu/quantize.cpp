// quantize_per_token / quantize_per_tensor: float activations -> int8, smoothing (x / smooth) fused.
// Rows are independent, so the work is split over rows (at::parallel_for); each row is read twice
// for per-token (absmax, then quantize), once for per-tensor.
#include "quant_rows.h"

namespace ptqrt_cpu {

namespace {

void check_x(const at::Tensor& x, const std::optional<at::Tensor>& smooth, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "ptqrt_cpu.", op,
              ": x must be a contiguous 2-D CPU tensor; got shape ", x.sizes(), ", strides ", x.strides());
  if (smooth.has_value())
    TORCH_CHECK(smooth->dim() == 1 && smooth->size(0) == x.size(1), "ptqrt_cpu.", op,
                ": smooth must be [K] = [", x.size(1), "]; got ", smooth->sizes());
}

// Rows per parallel task: at least ~16K elements so thread start-up is paid off.
int64_t row_grain(int64_t K) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, const std::optional<at::Tensor>& smooth) {
  check_x(x, smooth, "quantize_per_token");
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, scale};
  const F32Values sm(smooth);
  const float* smp = sm.data();  // (null: none)
  const Isa isa = active_isa();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  dispatch_float(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    at::parallel_for(0, M, row_grain(K), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const float s = absmax_scale(row_absmax(isa, xp + m * K, smp, K));
        sp[m] = s;
        row_quant(isa, xp + m * K, smp, s, qp + m * K, K);
      }
    });
  });
  return {q, scale};
}

at::Tensor quantize_per_tensor(const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& smooth) {
  check_x(x, smooth, "quantize_per_tensor");
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == at::kFloat, "ptqrt_cpu.quantize_per_tensor: scale must "
              "be one float32 value; got shape ", scale.sizes(), ", dtype ", scale.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  if (M == 0 || K == 0) return q;
  const float s = scale.item<float>();
  const F32Values sm(smooth);
  const float* smp = sm.data();  // (null: none)
  const Isa isa = active_isa();
  int8_t* qp = q.data_ptr<int8_t>();
  dispatch_float(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    at::parallel_for(0, M, row_grain(K), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) row_quant(isa, xp + m * K, smp, s, qp + m * K, K);
    });
  });
  return q;
}

}  // namespace ptqrt_cpu
