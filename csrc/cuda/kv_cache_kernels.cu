// Launcher for kv_cache_append (kernels/kv_cache.cuh).
#include "launch.h"
#include "kernels/kv_cache.cuh"

namespace ptqrt {
namespace cuda {
namespace {

template <typename T, int CHUNKS>
cudaError_t launch_vec4_n(int64_t units, int threads, const KvAppendArgs& a, cudaStream_t stream) {
  auto kernel = kv_cache_append_vec4_kernel<T, CHUNKS>;
  const int64_t per_cta = int64_t(kAppendWarps) * append_vec4_rows<CHUNKS>();
  const dim3 grid(static_cast<unsigned>(ceil_div64(units, per_cta)), a.streams);
  PTQRT_LAUNCH(kernel, grid, threads, 0, stream)(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_vec4(int chunks, int64_t units, int threads, const KvAppendArgs& a, cudaStream_t stream) {
  switch (chunks) {
    case 1: return launch_vec4_n<T, 1>(units, threads, a, stream);
    case 2: return launch_vec4_n<T, 2>(units, threads, a, stream);
    case 3:
    case 4: return launch_vec4_n<T, 4>(units, threads, a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_kv_cache_append(DType dt, const KvAppendArgs& a, cudaStream_t stream) {
  const int64_t units = int64_t(a.T) * a.H;
  if (units == 0 || a.D == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((units + kAppendWarps - 1) / kAppendWarps), a.streams);
  const int threads = kAppendWarps * kWarp;
  if (a.vec4) {  // D % 4 == 0, D <= 512, aligned (the host checked)
    const int chunks = (a.D + 4 * kWarp - 1) / (4 * kWarp);
    switch (dt) {
      case DType::F16: return launch_vec4<__half>(chunks, units, threads, a, stream);
      case DType::BF16: return launch_vec4<__nv_bfloat16>(chunks, units, threads, a, stream);
      case DType::F32: return launch_vec4<float>(chunks, units, threads, a, stream);
      default: return cudaErrorInvalidValue;
    }
  }
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
