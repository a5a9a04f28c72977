// Launchers for quantize_per_token / quantize_per_tensor (kernels/quantize.cuh).
#include "launch.h"
#include "kernels/quantize.cuh"

namespace ptqrt {
namespace cuda {
namespace {

template <typename T>
cudaError_t per_token(const void* x, const float* smooth, int8_t* x_q, float* x_scale, int64_t M, int64_t K, bool vec,
                      bool one_pass, bool recip, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t units = vec ? K / V : K;
  // Enough threads to cover the row once, rounded to warps; short rows get one warp.
  const int threads = static_cast<int>(units >= 256 ? 256 : (units <= 32 ? 32 : (units + 31) / 32 * 32));
  const dim3 grid(static_cast<unsigned>(M));
  // one_pass (the default): rows of up to 4 vectors a thread stay in registers (one read of x, as the
  // Triton kernel does); longer rows and unaligned ones take the two-pass kernel (on an H100 at 8192 x
  // 8192 fp16: one-pass 76.8 us, two-pass 85.8; PTQRT_CUDA_QUANT_1PASS=0 gives the two-pass kernel).
  // (K == 0 takes the two-pass kernel: the one-pass kernel loads each row's first vector unconditionally.)
  auto kernel = !vec ? quantize_per_token_kernel<T, 1>
                : !one_pass || units == 0 ? quantize_per_token_kernel<T, V>
                : units <= 1 * threads ? quantize_per_token_1pass_kernel<T, V, 1>
                : units <= 2 * threads ? quantize_per_token_1pass_kernel<T, V, 2>
                : units <= 4 * threads ? quantize_per_token_1pass_kernel<T, V, 4>
                : quantize_per_token_kernel<T, V>;
  PTQRT_LAUNCH(kernel, grid, threads, 0, stream)(static_cast<const T*>(x), smooth, x_q, x_scale, K, recip);
  return cudaGetLastError();
}

template <typename T>
cudaError_t per_tensor(const void* x, const float* scale, const float* smooth, int8_t* x_q, int64_t M, int64_t K,
                       bool vec, bool recip, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t total = M * K;
  const int64_t groups = vec ? total / V : total;
  const int threads = 256;
  // A grid-stride loop: a few waves of CTAs is enough to saturate memory, more only adds tail.
  const int64_t blocks = groups / threads + 1 < 65536 ? groups / threads + 1 : 65536;
  auto kernel = vec ? quantize_per_tensor_kernel<T, V> : quantize_per_tensor_kernel<T, 1>;
  PTQRT_LAUNCH(kernel, static_cast<unsigned>(blocks), threads, 0, stream)(static_cast<const T*>(x), scale, smooth, x_q,
                                                                          total, K, recip);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_quantize_per_token(DType dt, const void* x, const float* smooth, int8_t* x_q, float* x_scale, int64_t M,
                               int64_t K, bool vec, bool one_pass, bool recip, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  switch (dt) {
    case DType::F16: return per_token<__half>(x, smooth, x_q, x_scale, M, K, vec, one_pass, recip, stream);
    case DType::BF16: return per_token<__nv_bfloat16>(x, smooth, x_q, x_scale, M, K, vec, one_pass, recip, stream);
    case DType::F32: return per_token<float>(x, smooth, x_q, x_scale, M, K, vec, one_pass, recip, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_quantize_per_tensor(DType dt, const void* x, const float* scale, const float* smooth, int8_t* x_q,
                                int64_t M, int64_t K, bool vec, bool recip, cudaStream_t stream) {
  if (M == 0 || K == 0) return cudaSuccess;
  switch (dt) {
    case DType::F16: return per_tensor<__half>(x, scale, smooth, x_q, M, K, vec, recip, stream);
    case DType::BF16: return per_tensor<__nv_bfloat16>(x, scale, smooth, x_q, M, K, vec, recip, stream);
    case DType::F32: return per_tensor<float>(x, scale, smooth, x_q, M, K, vec, recip, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace ptqrt
