// Launcher for kv_cache_append (kernels/kv_cache.cuh).
#include "launch.h"
#include "kernels/kv_cache.cuh"

namespace ptqrt {
namespace cuda {
namespace {

template <typename T, int LPR>
cudaError_t launch_token_n(const KvAppendArgs& a, cudaStream_t stream) {
  auto kernel = kv_cache_append_token_kernel<T, LPR>;
  PTQRT_LAUNCH(kernel, dim3(a.T, a.streams), kTokenThreads, 0, stream)(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_token(const KvAppendArgs& a, cudaStream_t stream) {
  switch (a.D / append_token_vec<T>()) {  // D % VEC == 0 (the host checked)
    case 1: return launch_token_n<T, 1>(a, stream);
    case 2: return launch_token_n<T, 2>(a, stream);
    case 4: return launch_token_n<T, 4>(a, stream);
    case 8: return launch_token_n<T, 8>(a, stream);
    case 16: return launch_token_n<T, 16>(a, stream);
    case 32: return launch_token_n<T, 32>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_kv_cache_append(DType dt, const KvAppendArgs& a, cudaStream_t stream) {
  const int64_t units = int64_t(a.T) * a.H;
  if (units == 0 || a.D == 0) return cudaSuccess;
  if (a.kernel == AppendKernel::Token) {  // D = VEC * 2^i <= 32 VEC, aligned (the host checked)
    switch (dt) {
      case DType::F16: return launch_token<__half>(a, stream);
      case DType::BF16: return launch_token<__nv_bfloat16>(a, stream);
      case DType::F32: return launch_token<float>(a, stream);
      default: return cudaErrorInvalidValue;
    }
  }
  const dim3 grid(static_cast<unsigned>((units + kAppendWarps - 1) / kAppendWarps), a.streams);
  const int threads = kAppendWarps * kWarp;
  auto f16 = kv_cache_append_kernel<__half>;
  auto bf16 = kv_cache_append_kernel<__nv_bfloat16>;
  auto f32 = kv_cache_append_kernel<float>;
  switch (dt) {
    case DType::F16: PTQRT_LAUNCH(f16, grid, threads, 0, stream)(a); break;
    case DType::BF16: PTQRT_LAUNCH(bf16, grid, threads, 0, stream)(a); break;
    case DType::F32: PTQRT_LAUNCH(f32, grid, threads, 0, stream)(a); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ptqrt
