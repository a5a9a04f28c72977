// Launcher for kv_cache_append (kernels/kv_cache.cuh).
#include "launch.h"
#include "kernels/kv_cache.cuh"

namespace ptqrt {
namespace cuda {

cudaError_t launch_kv_cache_append(DType dt, const KvAppendArgs& a, cudaStream_t stream) {
  const int64_t units = int64_t(a.T) * a.H;
  if (units == 0 || a.D == 0) return cudaSuccess;
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
