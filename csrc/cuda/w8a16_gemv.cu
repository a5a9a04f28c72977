// Launchers for the M <= 16 paths of w8a16_gemm (kernels/w8a16_gemv.cuh).
#include "launch.h"
#include "kernels/w8a16_gemv.cuh"

namespace ptqrt {
namespace cuda {
namespace {

// 2 n8 tiles per CTA (16 columns) and 4 windows in flight: for N = 4096 that is 256 CTAs of 8 warps,
// each thread with 8 independent 16-byte weight loads outstanding.
constexpr int kTcTiles = 2, kTcUnroll = 4;
constexpr int kFmaRows = 2;
// The ring version: the same 16 columns per CTA, 4 windows per warp in the ring (3 in flight, 1 KB
// each: 24 KB of weights in flight per CTA with no weight registers held).
constexpr int kRingStages = 4;

template <typename T>
cudaError_t gemv_tc(const W8A16Args& a, cudaStream_t stream) {
  const dim3 grid(ceil_div(a.N, 8 * kTcTiles));
  auto kernel = w8a16_gemv_tc_kernel<T, kTcTiles, kTcUnroll>;
  PTQRT_LAUNCH(kernel, grid, kGemvWarps * kWarp, 0, stream)(
      static_cast<const T*>(a.x), a.w, a.w_scale, a.bias, static_cast<T*>(a.out), a.M, a.N, a.K, a.group_size);
  return cudaGetLastError();
}

template <typename T, bool GROUPED>
cudaError_t gemv_ring(const W8A16Args& a, cudaStream_t stream) {
  const dim3 grid(ceil_div(a.N, 8 * kTcTiles));
  auto kernel = w8a16_gemv_ring_kernel<T, kTcTiles, kRingStages, GROUPED>;
  const size_t smem = gemv_ring_smem_bytes<kTcTiles, kRingStages>();
  static size_t granted[64] = {};
  const cudaError_t e = opt_in_smem(kernel, smem, granted);
  if (e != cudaSuccess) return e;
  PTQRT_LAUNCH(kernel, grid, kGemvWarps * kWarp, smem, stream)(
      static_cast<const T*>(a.x), a.w, a.w_scale, a.bias, static_cast<T*>(a.out), a.M, a.N, a.K, a.group_size);
  return cudaGetLastError();
}

cudaError_t gemv_fma_f32(const W8A16Args& a, cudaStream_t stream) {
  const dim3 grid(ceil_div(a.N, kGemvWarps * kFmaRows));
  auto kernel = w8a16_gemv_fma_kernel<float, 16, kFmaRows>;
  PTQRT_LAUNCH(kernel, grid, kGemvWarps * kWarp, 0, stream)(
      static_cast<const float*>(a.x), a.w, a.w_scale, a.bias, static_cast<float*>(a.out), a.M, a.N, a.K,
      a.group_size);
  return cudaGetLastError();
}

}  // namespace

cudaError_t w8a16_gemv(DType dt, const W8A16Args& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (a.M > 16) return cudaErrorInvalidValue;
  switch (dt) {
    case DType::F16:
      if (!a.ring) return gemv_tc<__half>(a, stream);
      return a.group_size > 0 ? gemv_ring<__half, true>(a, stream) : gemv_ring<__half, false>(a, stream);
    case DType::BF16:
      if (!a.ring) return gemv_tc<__nv_bfloat16>(a, stream);
      return a.group_size > 0 ? gemv_ring<__nv_bfloat16, true>(a, stream) : gemv_ring<__nv_bfloat16, false>(a, stream);
    case DType::F32: return gemv_fma_f32(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace ptqrt
