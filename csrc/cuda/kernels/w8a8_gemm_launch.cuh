// Tile configurations and the launcher of the w8a8 mma.sync GEMM, instantiated once per output
// dtype in w8a8_gemm_{f16,bf16,f32,i32}.cu so that ninja compiles them in parallel.
#pragma once

#include "../launch.h"
#include "w8a8_gemm.cuh"
#include "w8a8_gemv.cuh"

namespace ptqrt {
namespace cuda {

// Large: 128x128 CTA tile, 8 warps of 64x32, 4 stages (128 KiB of shared memory; fits A100 and H100).
using W8A8Large = W8A8Tile<128, 128, 2, 4, 4, 8>;
// Small (decode and short prefill, M <= 64): 32x64 tile, 4 warps of 32x16, 5 stages so that enough
// weight bytes are in flight for a memory-bound GEMV-shaped problem; split-K fills the GPU.
using W8A8Small = W8A8Tile<32, 64, 1, 4, 5, 1>;

template <class C, typename OutT>
cudaError_t launch_w8a8_tile(const W8A8Args& a, cudaStream_t stream) {
  auto kernel = w8a8_gemm_kernel<C, OutT>;
  static size_t granted[64] = {};
  const cudaError_t e = opt_in_smem(kernel, C::SMEM_BYTES, granted);
  if (e != cudaSuccess) return e;
  const int tiles = ceil_div(a.M, C::BM) * ceil_div(a.N, C::BN);
  const dim3 grid(tiles, 1, a.splits);
  W8A8Epilogue epi{a.x_scale, a.x_scale_stride, a.w_scale, a.bias};
  PTQRT_LAUNCH(kernel, grid, C::THREADS, C::SMEM_BYTES, stream)(a.x, a.w, epi, static_cast<OutT*>(a.out),
                                                      a.splits > 1 ? a.partial : nullptr, a.M, a.N, a.K);
  return cudaGetLastError();
}

template <typename OutT>
cudaError_t run_w8a8(Tile tile, const W8A8Args& a, cudaStream_t stream) {
  return tile == Tile::Large ? launch_w8a8_tile<W8A8Large, OutT>(a, stream) : launch_w8a8_tile<W8A8Small, OutT>(a, stream);
}

// M <= 16: 2 n8 tiles (16 columns) per CTA, 2 windows of 128 bytes in flight per warp, so each thread
// has 8 independent 16-byte weight loads outstanding; N = 4096 gives 256 CTAs of 8 warps.
template <typename OutT>
cudaError_t run_w8a8_gemv(const W8A8Args& a, cudaStream_t stream) {
  constexpr int kTiles = 2, kUnroll = 2;
  W8A8Epilogue epi{a.x_scale, a.x_scale_stride, a.w_scale, a.bias};
  auto kernel = w8a8_gemv_kernel<OutT, kTiles, kUnroll>;
  PTQRT_LAUNCH(kernel, dim3(ceil_div(a.N, 8 * kTiles)), kW8A8GemvWarps * kWarp, 0, stream)(
      a.x, a.w, epi, static_cast<OutT*>(a.out), a.M, a.N, a.K);
  return cudaGetLastError();
}

template <typename OutT>
cudaError_t run_w8a8_split_reduce(const W8A8Args& a, cudaStream_t stream) {
  const int64_t total = int64_t(a.M) * a.N;
  const int threads = 256;
  const int64_t blocks = total / threads + 1 < 16384 ? total / threads + 1 : 16384;
  W8A8Epilogue epi{a.x_scale, a.x_scale_stride, a.w_scale, a.bias};
  auto kernel = w8a8_split_reduce_kernel<OutT>;
  PTQRT_LAUNCH(kernel, static_cast<unsigned>(blocks), threads, 0, stream)(a.partial, epi, static_cast<OutT*>(a.out), a.M,
                                                                          a.N, a.splits);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ptqrt
